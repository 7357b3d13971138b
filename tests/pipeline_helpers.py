"""Running the CLI (`python -m opsd_jax.main`) as a user does, a subprocess, for the pipeline,
resume and fault tests: tiny settings, waiting for a step's record, interrupting, comparing runs.

`reference_run` is the one uninterrupted tiny SFT -> RLVR -> OPSD run those tests compare
against; it is made once per pytest session, whichever module asks first.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "experiments", "toy_compaction.py")
STEPS = {"sft": 6, "rlvr": 5, "opsd": 3}
TINY_MODEL = [
    "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.head_dim=16",
    "--config.model.mlp_dim=128",
]
# Every stage really updates the model even from scratch: RLVR's over-length penalty gives rewards
# a spread inside each group (no correct answers yet), and OPSD trains on all rollouts.
TINY = TINY_MODEL + [
    "--config.data.num_train=1000", "--config.data.num_test=32",
    "--config.eval.num_problems=32", "--config.eval.max_new_tokens=96",
    "--config.sampling.max_new_tokens=96", "--config.sft.batch_size=8",
    f"--config.sft.steps={STEPS['sft']}", "--config.sft.checkpoint_every=2",
    f"--config.rlvr.steps={STEPS['rlvr']}", "--config.rlvr.prompts_per_step=4",
    "--config.rlvr.group_size=4", "--config.rlvr.checkpoint_every=2",
    "--config.rlvr.overlong_penalty=1.0", "--config.rlvr.overlong_buffer=64",
    f"--config.opsd.steps={STEPS['opsd']}", "--config.opsd.prompts_per_step=8",
    "--config.opsd.rollout_filter=all", "--config.opsd.checkpoint_every=1",
]


def env(**extra):
  out = dict(os.environ)
  # One CPU device, as a user's run gets (conftest fakes 8 in-process), and single-threaded
  # Eigen kernels: with several threads, float sums of an SFT step were seen to differ in the
  # last bit between processes, which bit-for-bit comparisons across processes cannot allow.
  out["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
  out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
  out.update(extra)
  return out


def command(config, workdir, *extra):
  return [sys.executable, "-m", "opsd_jax.main", "--config", config, "--workdir", str(workdir),
          *extra]


def run(config, workdir, *extra, timeout=600, extra_env=None):
  """(CompletedProcess with text stdout/stderr, seconds)."""
  t0 = time.time()
  proc = subprocess.run(command(config, workdir, *extra), cwd=REPO, env=env(**(extra_env or {})),
                        capture_output=True, text=True, timeout=timeout)
  return proc, time.time() - t0


def assert_ok(proc):
  assert proc.returncode == 0, \
      f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def error_line(proc, prefix="error:"):
  """The run's one error line on stderr, and no traceback through our code. (A checkpoint with
  a missing file makes tensorstore's threads print 'Event loop is closed' tracebacks of their
  own around it; those are the library's, not a crash of the run.)"""
  lines = [l for l in proc.stderr.splitlines() if l.startswith(prefix)]
  assert len(lines) == 1, proc.stderr[-3000:]
  frames = [l for l in proc.stderr.splitlines() if l.strip().startswith("File ")
            and "opsd_jax" in l]
  assert not frames, proc.stderr[-3000:]
  return lines[0]


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def comparable_records(workdir):
  """metrics.jsonl without wall-clock times, as JSON text (NaN then equals NaN)."""
  return [json.dumps({k: v for k, v in r.items() if k != "time"}, sort_keys=True)
          for r in records(workdir)]


def comparable_results(workdir):
  drop = ("seconds", "train_seconds")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return {stage: json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True)
          for stage, r in results.items()}


def final_params(workdir, stage):
  import jax
  from opsd_jax import checkpoint
  params = checkpoint.load_params(os.path.join(workdir, stage, "final"))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_run(workdir, reference, stages=tuple(STEPS)):
  """Bit for bit the reference's final parameters, metrics records and evaluations."""
  for stage in stages:
    want, got = final_params(reference, stage), final_params(workdir, stage)
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{stage} {key}")
  assert comparable_records(workdir) == comparable_records(reference)
  assert comparable_results(workdir) == comparable_results(reference)


_REFERENCE = {}


def reference_run(tmp_path_factory):
  """(workdir, CompletedProcess, seconds) of the uninterrupted TINY run, made once a session."""
  key = str(tmp_path_factory.getbasetemp())
  if key not in _REFERENCE:
    workdir = tmp_path_factory.mktemp("full")
    proc, seconds = run(TOY, workdir, *TINY)
    assert_ok(proc)
    _REFERENCE[key] = (workdir, proc, seconds)
  return _REFERENCE[key]


def wait_for_record(workdir, stage, step, proc, timeout=300):
  """Blocks until metrics.jsonl holds a complete record of `stage` at `step` or later."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended (exit {proc.returncode}) before {stage} step {step}")
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          if line.strip() and line.endswith("\n"):
            r = json.loads(line)
            if r["stage"] == stage and r["step"] >= step:
              return
    time.sleep(0.05)
  raise AssertionError(f"no {stage} step {step} record within {timeout} s")


def interrupt(config, workdir, *extra, stage, step, sig, log_prefix, timeout=300):
  """Starts the CLI, sends `sig` to it once `stage` logged `step`, waits for it to end.
  Returns (exit status, stdout, stderr); output goes through files (no pipe to fill)."""
  out_path, err_path = f"{log_prefix}.out", f"{log_prefix}.err"
  with open(out_path, "w") as out, open(err_path, "w") as err:
    proc = subprocess.Popen(command(config, workdir, *extra), cwd=REPO, env=env(),
                            stdout=out, stderr=err, start_new_session=True)
    try:
      wait_for_record(workdir, stage, step, proc)
      os.kill(proc.pid, sig)
      code = proc.wait(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      try:  # grader workers die with their parent; make sure nothing of this session lingers
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  with open(out_path) as f_out, open(err_path) as f_err:
    return code, f_out.read(), f_err.read()


def record_fuzz_counts(tmp_path_factory, name, counts):
  """Adds `counts` (a dict) under `name` to <pytest basetemp>/fuzz_counts.json, so a session's
  fuzzing volume can be read after the run without -s."""
  path = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
  found = json.loads(path.read_text()) if path.exists() else {}
  found[name] = dict(sorted(counts.items()))
  path.write_text(json.dumps(found, indent=2, sort_keys=True))
  return path
