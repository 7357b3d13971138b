#!/usr/bin/env python3
"""Builds (and runs) the exact gcloud commands that put an experiment on a Cloud TPU VM slice.

  python3 launch/tpu.py ACTION [ACTION ...] --name NAME --zone ZONE --accelerator TYPE [options]

Actions, run in the order given: create (a TPU VM, or with --queued a queued resource, waited on
until ACTIVE), install (this repo's HEAD + pinned deps with jax[tpu] on every worker), stage
(local checkpoints, tokenizers, data given by --stage: to gs:// or to every worker's disk), run
(the experiment on every worker, one process per host, detached; JAX finds its peers from the TPU
environment), logs (follow a worker's log), copy (a single-host workdir to gs://), delete.
`--dry_run` prints the commands instead of running them. Standard library only, so it runs on a
laptop without JAX. The bash wrappers create.sh / run.sh / teardown.sh call it; see README.md.

Workdirs: a single host writes to its local disk and syncs to --bucket (on start, to resume a
previous run; every --sync_every_s; at the end). A multi-host slice needs one directory that all
processes share (orbax writes one checkpoint from all of them), so it runs in the bucket mounted
with gcsfuse. Either way, rerunning the same `run` resumes from the workdir.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_REPO = "$HOME/opsd-jax"  # expanded by the worker's shell
REMOTE_RUNS = "$HOME/opsd-runs"
REMOTE_MOUNT = "$HOME/opsd-gcs"
ARCHIVE = "opsd-jax.tar.gz"
RENAME_DIR_LIMIT = 100_000  # gcsfuse: the most files a renamed directory may hold
JAX_VERSION = "0.10.2"  # = setup.py's pin; jax[tpu] brings the matching libtpu
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


@dataclasses.dataclass(frozen=True)
class TpuFamily:
  prefix: str  # accelerator type = prefix + size
  runtime: str  # TPU software version (gcloud --version / --runtime-version)
  cores_per_chip: int  # v4 and v5p sizes count TensorCores (2 per chip), v5e and v6e count chips
  chips_per_host: int  # of a multi-host slice
  single_host_max: int  # largest size that is one VM


# https://cloud.google.com/tpu/docs/runtimes
FAMILIES = {
    "v4": TpuFamily("v4-", "tpu-ubuntu2204-base", 2, 4, 8),
    "v5e": TpuFamily("v5litepod-", "v2-alpha-tpuv5-lite", 1, 4, 8),
    "v5p": TpuFamily("v5p-", "v2-alpha-tpuv5", 2, 4, 8),
    "v6e": TpuFamily("v6e-", "v2-alpha-tpuv6e", 1, 4, 8),
}
ACTIONS = ("create", "install", "stage", "run", "logs", "copy", "delete")


@dataclasses.dataclass(frozen=True)
class Slice:
  family: str
  accelerator: str
  chips: int
  hosts: int

  @property
  def multi_host(self) -> bool:
    return self.hosts > 1


def parse_accelerator(accelerator: str) -> Slice:
  """'v5litepod-8' -> v5e, 8 chips, 1 host; 'v5p-32' -> v5p, 16 chips, 4 hosts."""
  for family, f in FAMILIES.items():
    m = re.fullmatch(re.escape(f.prefix) + r"(\d+)", accelerator)
    if m:
      size = int(m.group(1))
      if size < 1 or size % f.cores_per_chip:
        break
      chips = size // f.cores_per_chip
      hosts = 1 if size <= f.single_host_max else -(-chips // f.chips_per_host)
      return Slice(family, accelerator, chips, hosts)
  known = ", ".join(f"{f.prefix}N ({name})" for name, f in FAMILIES.items())
  raise ValueError(f"--accelerator: unknown TPU type {accelerator!r}; expected one of {known}, "
                   "e.g. v5litepod-8, v5p-32, v4-8, v6e-16")


# --------------------------------------------------------------------------------------------
# Command builders: each returns a list of argv lists (no shell on this side).
# --------------------------------------------------------------------------------------------


def _where(a) -> list[str]:
  return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def _ssh(a, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *_where(a), f"--worker={worker}",
          f"--command={command}"]


def create_commands(a) -> list[list[str]]:
  s = parse_accelerator(a.accelerator)
  runtime = a.runtime or FAMILIES[s.family].runtime
  if a.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
           *_where(a), f"--accelerator-type={s.accelerator}", f"--runtime-version={runtime}"]
    cmd += ["--spot"] if a.spot else []
    return [cmd]
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_where(a),
         f"--accelerator-type={s.accelerator}", f"--version={runtime}"]
  return [cmd + (["--spot"] if a.spot else [])]


def queued_state_command(a) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, *_where(a),
          "--format=value(state.state)"]


def install_commands(a) -> list[list[str]]:
  """Ship this repo's committed HEAD (what a rerun will see too) and pip-install it with the
  pinned runtime deps and jax[tpu] on every worker; gcsfuse too where the slice needs it."""
  s = parse_accelerator(a.accelerator)
  archive = os.path.join(a.tmpdir, ARCHIVE)
  remote = " && ".join([
      f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO}",
      f"tar -xzf $HOME/{ARCHIVE} -C {REMOTE_REPO}",
      "python3 -m pip install --upgrade pip",
      f"python3 -m pip install -e '{REMOTE_REPO}[tpu]' -f {LIBTPU_INDEX}",
      f"python3 -c 'import jax; assert jax.__version__ == \"{JAX_VERSION}\", jax.__version__'",
  ])
  if uses_gcsfuse(a, s):
    remote = GCSFUSE_INSTALL + " && " + remote
  return [
      ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{a.name}:~/{ARCHIVE}", *_where(a),
       "--worker=all"],
      _ssh(a, remote),
  ]


def parse_stage(spec: str) -> tuple[str, str]:
  """'LOCAL=DEST' -> (absolute local path, DEST). DEST is gs://BUCKET/PATH or a path under the
  workers' home directory (~/x/y or x/y): a plain name, since staging replaces it."""
  local, sep, dest = spec.rpartition("=")
  if not sep or not local or not dest:
    raise ValueError(f"--stage must be LOCAL=gs://BUCKET/PATH or LOCAL=~/WORKER_PATH, got {spec!r}")
  if not os.path.exists(local):
    raise ValueError(f"--stage: no local file or directory {local!r}")
  if dest.startswith("gs://"):
    bucket, path = split_bucket(dest)
    if not path:
      raise ValueError(f"--stage: {dest!r} needs a path inside the bucket")
    return os.path.abspath(local), f"gs://{bucket}/{path}"
  rel = dest[2:] if dest.startswith("~/") else dest
  parts = rel.split("/")
  if not re.fullmatch(r"[-_.a-zA-Z0-9/]+", rel) or any(p in ("", ".", "..") for p in parts) \
      or rel.startswith("-"):
    raise ValueError(f"--stage: worker path {dest!r} must be ~/DIR/NAME or DIR/NAME under the "
                     "home directory (letters, digits, -_./, no '..')")
  return os.path.abspath(local), "~/" + rel


def stage_commands(a) -> list[list[str]]:
  """Puts each --stage LOCAL=DEST in place before a run. DEST gs://...: uploaded once from here
  (rsync: a rerun sends only changed files); the run names the gs:// path and every worker copies
  it into its own cache (opsd_jax/remote.py). DEST a worker path: copied to every worker's disk
  with tpu-vm scp, after removing an earlier copy (scp would nest a rerun inside it)."""
  if not a.stage:
    raise ValueError("stage: --stage LOCAL=DEST is required")
  commands = []
  for spec in a.stage:
    local, dest = parse_stage(spec)
    if dest.startswith("gs://"):
      commands.append(["gcloud", "storage", "rsync", "--recursive", local, dest]
                      if os.path.isdir(local) else ["gcloud", "storage", "cp", local, dest])
      continue
    parent = dest.rsplit("/", 1)[0]
    commands.append(_ssh(a, f"rm -rf {dest} && mkdir -p {parent}"))
    # scp's remote side: a relative path is under the home directory (no ~ to expand)
    commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", local,
                     f"{a.name}:{dest[2:]}", *_where(a), "--worker=all"])
  return commands


# gcsfuse from Google's apt repository (https://cloud.google.com/storage/docs/gcsfuse-install)
GCSFUSE_INSTALL = (
    "(command -v gcsfuse >/dev/null || ("
    "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
    "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list"
    " && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
    "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
    " && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))")


def uses_gcsfuse(a, s: Slice) -> bool:
  return s.multi_host or a.gcsfuse


def run_name(a) -> str:
  return a.run_name or os.path.splitext(os.path.basename(a.config))[0]


def split_bucket(bucket: str) -> tuple[str, str]:
  m = re.fullmatch(r"gs://([a-z0-9][-_.a-z0-9]*)(/[-_./a-zA-Z0-9]*)?", bucket.rstrip("/"))
  if not m:
    raise ValueError(f"--bucket must look like gs://BUCKET[/PATH] (letters, digits, -_./), got "
                     f"{bucket!r}")
  return m.group(1), (m.group(2) or "").strip("/")


def remote_log(a) -> str:
  return f"{REMOTE_RUNS}/{run_name(a)}.log"


def run_script(a) -> str:
  """The bash script each worker runs (detached): workdir set-up, the experiment, final sync.
  SIGTERM (preemption, `kill`) is passed on to the run, which checkpoints before it exits."""
  s = parse_accelerator(a.accelerator)
  name = run_name(a)
  if not a.bucket:
    if s.multi_host:
      raise ValueError(f"--bucket gs://... is required on the multi-host slice {s.accelerator} "
                       f"({s.hosts} hosts): its processes must share one workdir")
    gcs = None
  else:
    bucket, path = split_bucket(a.bucket)
    gcs = f"gs://{bucket}/{path + '/' if path else ''}{name}"
  main = ["python3", "-m", "opsd_jax.main", f"--config={shlex.quote(a.config)}"]
  lines = ["set -u", f"mkdir -p {REMOTE_RUNS}"]
  if gcs and uses_gcsfuse(a, s):
    mount = f"{REMOTE_MOUNT}/{bucket}"
    workdir = f"{mount}/{path + '/' if path else ''}{name}"
    lines += [f"mkdir -p {mount}",
              # directory renames (orbax's and hf.export's temp dirs) are off by default
              f"mountpoint -q {mount} || gcsfuse --implicit-dirs "
              f"--rename-dir-limit={RENAME_DIR_LIMIT} {bucket} {mount}",
              f"mkdir -p {workdir}"]
    sync = None
  else:
    workdir = f"{REMOTE_RUNS}/{name}"
    lines.append(f"mkdir -p {workdir}")
    sync = f"gcloud storage rsync --recursive {workdir} {gcs}" if gcs else None
    if gcs:  # resume: bring back what an earlier (maybe preempted, deleted) VM saved
      lines.append(f"gcloud storage rsync --recursive {gcs} {workdir} || true")
  main.append(f"--workdir={workdir}")  # unquoted: $HOME expands; the parts are checked safe
  main += [_override_arg(o) for o in a.override]
  lines.append(f"cd {REMOTE_REPO}")
  if sync:
    # the periodic sync; on TERM it takes its sleep along (an orphan would hold the log open)
    lines.append(f"(trap 'kill $s 2>/dev/null; exit 0' TERM; while true; do sleep "
                 f"{a.sync_every_s} & s=$!; wait $s; {sync} || true; done) & syncer=$!")
  lines += [" ".join(main) + " & pid=$!",
            'trap "kill -TERM \\$pid" TERM INT',
            "wait $pid; status=$?",
            "if kill -0 $pid 2>/dev/null; then wait $pid; status=$?; fi"]
  if sync:
    lines += ["kill $syncer 2>/dev/null", f"{sync} || status=$((status ? status : 1))"]
  lines += ["echo \"opsd-run: exit status $status\"", "exit $status"]
  return "\n".join(lines)


def _override_arg(override: str) -> str:
  """--config.KEY=VALUE, quoted for the worker's shell; a VALUE starting with ~/ becomes the
  worker's $HOME/... (a file staged to the workers' disks)."""
  flag = override if override.startswith("--") else f"--{override}"
  key, sep, value = flag.partition("=")
  if sep and value.startswith("~/"):
    return shlex.quote(f"{key}=") + '"$HOME"/' + shlex.quote(value[2:])
  return shlex.quote(flag)


def run_commands(a) -> list[list[str]]:
  """Starts the run on every worker, detached (nohup), so a dropped ssh does not kill it; each
  worker logs to its own file. One process per host: no coordinator flags, JAX reads the TPU
  environment (parallel.initialize_distributed)."""
  script = run_script(a)
  log = remote_log(a)
  remote = (f"mkdir -p {REMOTE_RUNS} && nohup bash -c {shlex.quote(script)} > {log} 2>&1 "
            "< /dev/null &")
  return [_ssh(a, remote)]


def logs_commands(a) -> list[list[str]]:
  return [_ssh(a, f"tail -n +1 -F {remote_log(a)}", worker=str(a.worker))]


def copy_commands(a) -> list[list[str]]:
  """Copies the workdir of a single host to the bucket now (a run also does it when it ends)."""
  if not a.bucket:
    raise ValueError("copy: --bucket gs://... is required")
  s = parse_accelerator(a.accelerator)
  if uses_gcsfuse(a, s):
    return []  # the workdir is in the bucket already
  bucket, path = split_bucket(a.bucket)
  gcs = f"gs://{bucket}/{path + '/' if path else ''}{run_name(a)}"
  return [_ssh(a, f"gcloud storage rsync --recursive {REMOTE_RUNS}/{run_name(a)} {gcs}",
               worker="0")]


def delete_commands(a) -> list[list[str]]:
  if a.queued:  # --force deletes the TPU VM the queued resource holds as well
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, *_where(a),
             "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_where(a), "--quiet"]]


BUILDERS = {"create": create_commands, "install": install_commands, "stage": stage_commands,
            "run": run_commands,
            "logs": logs_commands, "copy": copy_commands, "delete": delete_commands}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("actions", nargs="+", choices=ACTIONS, metavar="ACTION",
                 help=f"one or more of {', '.join(ACTIONS)}, run in this order")
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-east5-b, us-central2-b")
  p.add_argument("--accelerator", required=True, help="e.g. v5litepod-8, v5p-32, v4-8, v6e-16")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  p.add_argument("--runtime", default=None, help="TPU software version (default: per type)")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  p.add_argument("--queued", action="store_true", help="create through a queued resource")
  p.add_argument("--config", default="experiments/toy_compaction.py",
                 help="experiment file, relative to the repo")
  p.add_argument("--run_name", default=None, help="workdir name (default: the config's stem)")
  p.add_argument("--bucket", default=None, help="gs://BUCKET[/PATH] for workdirs")
  p.add_argument("--gcsfuse", action="store_true",
                 help="single host too: run in the mounted bucket instead of local + sync")
  p.add_argument("--sync_every_s", type=int, default=600, help="local workdir -> bucket period")
  p.add_argument("--override", action="append", default=[], metavar="config.KEY=VALUE",
                 help="passed to main as --config.KEY=VALUE (repeatable)")
  p.add_argument("--stage", action="append", default=[], metavar="LOCAL=DEST",
                 help="stage: copy LOCAL to gs://BUCKET/PATH (the run reads it from there) or to "
                      "~/PATH on every worker (repeatable)")
  p.add_argument("--worker", default="0", help="logs: which worker to follow")
  p.add_argument("--tmpdir", default="/tmp", help="where install writes the repo archive")
  p.add_argument("--poll_s", type=int, default=30, help="queued resource: seconds between polls")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return p


def check_args(a):
  parse_accelerator(a.accelerator)
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a.name):
    raise ValueError(f"--name must be lowercase letters, digits and '-', got {a.name!r}")
  if a.bucket:
    split_bucket(a.bucket)
  if not re.fullmatch(r"[-_.a-zA-Z0-9]+", run_name(a)):
    raise ValueError(f"--run_name must be letters, digits and -_., got {run_name(a)!r}")
  if "stage" in a.actions:
    if not a.stage:
      raise ValueError("stage: --stage LOCAL=DEST is required")
    for spec in a.stage:
      parse_stage(spec)
  if "run" in a.actions:
    run_script(a)  # the multi-host bucket requirement, before anything is created
    if not os.path.exists(os.path.join(REPO_ROOT, a.config)):
      raise ValueError(f"--config: no file {a.config} in {REPO_ROOT}")


def wait_until_active(a, runner=subprocess.run):
  while True:
    state = runner(queued_state_command(a), capture_output=True, text=True,
                   check=True).stdout.strip()
    print(f"queued resource {a.name}: {state}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise RuntimeError(f"queued resource {a.name} is {state}")
    time.sleep(a.poll_s)


def main(argv=None) -> int:
  a = parser().parse_args(argv)
  try:
    check_args(a)
  except ValueError as e:
    print(f"launch/tpu.py: {e}", file=sys.stderr)
    return 2
  for action in a.actions:
    commands = BUILDERS[action](a)
    for cmd in commands:
      print(("" if a.dry_run else "+ ") + shlex.join(cmd), flush=True)
      if not a.dry_run:
        subprocess.run(cmd, check=True)
    if action == "create" and a.queued:
      if a.dry_run:
        print(f"# then poll until ACTIVE: {shlex.join(queued_state_command(a))}")
      else:
        wait_until_active(a)
  return 0


if __name__ == "__main__":
  sys.exit(main())
