"""launch/: the dry-run gcloud commands for a single-host v5e-8 (v5litepod-8) and a multi-host
v5p-32 slice, staging local files (to gs:// or to every worker), and the worker-side run script executed for real by bash (with a stand-in gcloud
and experiment, since neither a TPU nor GCS is reachable here): resume sync before the run,
SIGTERM forwarded to the run, final sync after it."""
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("launch_tpu", os.path.join(ROOT, "launch/tpu.py"))
tpu = importlib.util.module_from_spec(_spec)
sys.modules["launch_tpu"] = tpu  # dataclasses look their module up there
_spec.loader.exec_module(tpu)

V5E = ["--name", "opsd-e", "--zone", "us-west4-a", "--accelerator", "v5litepod-8"]
V5P = ["--name", "opsd-p", "--zone", "us-east5-a", "--accelerator", "v5p-32", "--project", "proj"]


def commands(actions, argv):
  """The argv lists the builders give for these actions."""
  a = tpu.parser().parse_args([*actions, *argv])
  return [cmd for action in actions for cmd in tpu.BUILDERS[action](a)]


def check_printed(out, actions, argv):
  """The dry run printed exactly these commands, one shell-quoted command each (a multi-line
  remote script stays inside its quotes), and nothing ran; returns them as argv lists."""
  assert out.returncode == 0, out.stderr
  want = commands(actions, argv)
  printed = [line for line in out.stdout.split("\n") if not line.startswith("#")]
  assert "\n".join(printed).strip() == "\n".join(shlex.join(c) for c in want)
  return want


def dry_run(*argv):
  actions = [x for x in argv[:argv.index("--name")]]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch/tpu.py"), *argv, "--dry_run"],
                       capture_output=True, text=True, timeout=60)
  return check_printed(out, actions, argv[len(actions):])


def wrapper(script, actions, *argv):
  out = subprocess.run([os.path.join(ROOT, "launch", script), *argv, "--dry_run"],
                       capture_output=True, text=True, timeout=60)
  return check_printed(out, actions, argv)


@pytest.mark.parametrize("accelerator,family,chips,hosts", [
    ("v5litepod-8", "v5e", 8, 1), ("v5litepod-16", "v5e", 16, 4), ("v5p-8", "v5p", 4, 1),
    ("v5p-32", "v5p", 16, 4), ("v4-8", "v4", 4, 1), ("v4-32", "v4", 16, 4),
    ("v6e-8", "v6e", 8, 1), ("v6e-16", "v6e", 16, 4)])
def test_accelerator_types(accelerator, family, chips, hosts):
  s = tpu.parse_accelerator(accelerator)
  assert (s.family, s.chips, s.hosts) == (family, chips, hosts)


def test_bad_accelerator_and_names_are_refused_before_any_command():
  for bad in ("v5e-8", "v5p-7", "tpu"):
    with pytest.raises(ValueError, match="unknown TPU type"):
      tpu.parse_accelerator(bad)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch/tpu.py"), "create", "--name",
                        "Bad_Name", "--zone", "z", "--accelerator", "v5p-8", "--dry_run"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "--name" in out.stderr and out.stdout == ""


def test_single_host_v5e_8_create_install_run_teardown():
  create, archive, scp, install = wrapper("create.sh", ["create", "install"], *V5E, "--spot")
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "opsd-e", "--zone=us-west4-a",
                    "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert archive[:3] == ["git", "-C", ROOT] and "HEAD" in archive
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/opsd-jax.tar.gz"]
  assert "--worker=all" in scp
  assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opsd-e"]
  assert "--worker=all" in install
  command = install[-1]
  assert "pip install -e '$HOME/opsd-jax[tpu]' -f " + tpu.LIBTPU_INDEX in command
  assert 'jax.__version__ == "0.10.2"' in command and "gcsfuse" not in command

  run, logs = wrapper("run.sh", ["run", "logs"], *V5E, "--config", "experiments/toy_compaction.py", "--bucket",
                      "gs://my-bucket/runs", "--override", "config.sft.steps=3")
  assert run[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opsd-e", "--zone=us-west4-a"]
  assert run[7] == "--worker=all"
  script = run[8]
  assert "nohup bash -c" in script and "$HOME/opsd-runs/toy_compaction.log" in script
  assert "OPSD_COORDINATOR" not in script  # one process per host, peers from the TPU env
  # local workdir: restored from the bucket first (resume), synced back at the end
  restore = script.index("gcloud storage rsync --recursive gs://my-bucket/runs/toy_compaction "
                         "$HOME/opsd-runs/toy_compaction")
  start = script.index("python3 -m opsd_jax.main --config=experiments/toy_compaction.py "
                       "--workdir=$HOME/opsd-runs/toy_compaction --config.sft.steps=3")
  final = script.rindex("gcloud storage rsync --recursive $HOME/opsd-runs/toy_compaction "
                        "gs://my-bucket/runs/toy_compaction")
  assert restore < start < final
  assert logs == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opsd-e", "--zone=us-west4-a",
                  "--worker=0", "--command=tail -n +1 -F $HOME/opsd-runs/toy_compaction.log"]

  copy, delete = wrapper("teardown.sh", ["copy", "delete"], *V5E, "--bucket", "gs://my-bucket/runs")
  assert copy[-2:] == ["--worker=0", "--command=gcloud storage rsync --recursive "
                       "$HOME/opsd-runs/toy_compaction gs://my-bucket/runs/toy_compaction"]
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "opsd-e", "--zone=us-west4-a",
                    "--quiet"]
  assert wrapper("teardown.sh", ["delete"], *V5E) == [delete]  # no bucket: nothing to copy


def test_multi_host_v5p_32_queued_spot_slice():
  lines = dry_run("create", "install", "run", "delete", *V5P, "--queued", "--spot", "--bucket",
                  "gs://my-bucket", "--run_name", "grid-1")
  create, archive, scp, install, run, delete = lines
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "opsd-p",
                    "--node-id=opsd-p", "--zone=us-east5-a", "--project=proj",
                    "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--spot"]
  assert "--worker=all" in scp and "--project=proj" in scp
  assert "--worker=all" in install and "sudo apt-get install -y -q gcsfuse" in install[-1]
  # every worker runs the same command: no per-worker flags, no coordinator address
  assert run[7:9] == ["--project=proj", "--worker=all"]
  script = run[9]
  assert ("gcsfuse --implicit-dirs --rename-dir-limit=100000 my-bucket $HOME/opsd-gcs/my-bucket"
          in script)
  assert "--workdir=$HOME/opsd-gcs/my-bucket/grid-1" in script
  assert "OPSD_" not in script and "rsync" not in script  # the shared mount is the workdir
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "opsd-p",
                    "--zone=us-east5-a", "--project=proj", "--force", "--quiet"]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch/tpu.py"), "create", "run",
                        *V5P, "--dry_run"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "--bucket gs://... is required on the multi-host" in out.stderr
  assert out.stdout == ""  # refused before creating anything


def test_stage_to_the_bucket_and_to_every_worker(tmp_path):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text("{}")
  data = tmp_path / "train.jsonl"
  data.write_text("{}\n")
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text("{}")
  argv = [*V5P, "--bucket", "gs://my-bucket/runs",
          "--stage", f"{ckpt}=gs://my-bucket/staged/ckpt",
          "--stage", f"{data}=gs://my-bucket/staged/train.jsonl",
          "--stage", f"{tok}=~/opsd-data/tok",
          "--override", "config.init_from=gs://my-bucket/staged/ckpt",
          "--override", "config.tokenizer.path=~/opsd-data/tok"]
  lines = wrapper("run.sh", ["stage", "run", "logs"], *argv)
  upload_dir, upload_file, clear, scp, run, _ = lines
  assert upload_dir == ["gcloud", "storage", "rsync", "--recursive", str(ckpt),
                        "gs://my-bucket/staged/ckpt"]
  assert upload_file == ["gcloud", "storage", "cp", str(data), "gs://my-bucket/staged/train.jsonl"]
  # a worker path: an earlier copy removed first (scp would nest the new one inside it), then
  # copied to every worker of the slice
  assert clear == tpu._ssh(tpu.parser().parse_args(["stage", *V5P]),
                           "rm -rf ~/opsd-data/tok && mkdir -p ~/opsd-data")
  assert clear[7:9] == ["--project=proj", "--worker=all"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(tok),
                 "opsd-p:opsd-data/tok", "--zone=us-east5-a", "--project=proj", "--worker=all"]
  assert "--config.init_from=gs://my-bucket/staged/ckpt" in run[-1]  # workers read gs:// paths
  # ~/ in an override is the worker's home, expanded by the worker's shell
  arg = '--config.tokenizer.path="$HOME"/opsd-data/tok'
  script = tpu.run_script(tpu.parser().parse_args(["run", *argv]))
  assert arg in script and shlex.quote(script) in run[-1]
  out = subprocess.run(["bash", "-c", f"printf %s {arg}"], capture_output=True, text=True,
                       env={"HOME": "/home/worker", "PATH": os.environ["PATH"]}, timeout=60)
  assert out.stdout == "--config.tokenizer.path=/home/worker/opsd-data/tok"
  # without --stage run.sh neither stages nor asks for it
  assert len(wrapper("run.sh", ["run", "logs"], *V5P, "--bucket", "gs://my-bucket")) == 2


@pytest.mark.parametrize("stage,message", [
    (None, "stage: --stage LOCAL=DEST is required"),
    ("no/such/dir=gs://b/x", "no local file or directory 'no/such/dir'"),
    ("{local}=gs://b", "needs a path inside the bucket"),
    ("{local}=/etc/x", "worker path '/etc/x' must be"),
    ("{local}=~/../x", "worker path '~/../x' must be"),
    ("{local}", "--stage must be LOCAL=gs://BUCKET/PATH or LOCAL=~/WORKER_PATH"),
])
def test_bad_stage_is_refused_before_any_command(tmp_path, stage, message):
  argv = [sys.executable, os.path.join(ROOT, "launch/tpu.py"), "create", "stage", *V5E]
  if stage:
    argv += ["--stage", stage.format(local=tmp_path)]
  out = subprocess.run([*argv, "--dry_run"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and message in out.stderr and out.stdout == "", out.stderr


FAKE_GCLOUD = """#!/usr/bin/env bash
echo "gcloud $*" >> "$HOME/calls"
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for `python3 -m opsd_jax.main`: records its args, "checkpoints" on SIGTERM
echo "main $*" >> "$HOME/calls"
trap 'echo checkpoint >> "$HOME/calls"; exit 143' TERM
touch "$HOME/started"
while true; do sleep 0.1; done
"""


def test_run_script_resumes_forwards_sigterm_and_syncs_after(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  (tmp_path / "opsd-jax").mkdir()
  a = tpu.parser().parse_args(["run", *V5E, "--bucket", "gs://b/runs", "--sync_every_s", "3600"])
  env = dict(os.environ, HOME=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}")
  proc = subprocess.Popen(["bash", "-c", tpu.run_script(a)], env=env, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
      assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a preemption or `kill` delivers
    out = proc.communicate(timeout=30)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, out
  assert "opsd-run: exit status 143" in out
  calls = (tmp_path / "calls").read_text().splitlines()
  workdir = f"{tmp_path}/opsd-runs/toy_compaction"
  assert calls == [
      f"gcloud storage rsync --recursive gs://b/runs/toy_compaction {workdir}",
      f"main -m opsd_jax.main --config=experiments/toy_compaction.py --workdir={workdir}",
      "checkpoint",
      f"gcloud storage rsync --recursive {workdir} gs://b/runs/toy_compaction"]
