"""The whole experiment on 2 processes: `python -m opsd_jax.main` launched twice (process 0 and 1
of 2, 4 fake CPU devices each, JAX's multi-controller runtime on localhost) runs the toy SFT ->
RLVR -> OPSD with tiny settings. Each process reads its own rows of every batch, rollouts and
decisions are global; only process 0 writes results, metrics and plots. The pair is killed once
SFT is done and rerun: it resumes, and the finished run equals a single process on 8 devices
(evaluations equal, final parameters close).

The fast tests check the data side alone: the processes' batches, concatenated in process order,
are the single-process batches (so the global batch does not depend on the process count).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pipeline_helpers as helpers
from opsd_jax import data

# Tiny, and short enough for CI: mesh data = all 8 devices (batches of 8 / 16 / 8 rows); short
# completions, since every decode step of the 2-process sampler waits on cross-process (gloo)
# collectives.
ARGS = helpers.TINY + [
    "--config.mesh.data=-1", "--config.sft.steps=4", "--config.rlvr.steps=2",
    "--config.opsd.steps=2", "--config.opsd.checkpoint_every=2", "--config.eval.num_problems=16",
    "--config.data.num_test=16", "--config.sampling.max_new_tokens=48",
    "--config.eval.max_new_tokens=48", "--config.rlvr.overlong_buffer=32",
]
STAGES = ("sft", "rlvr", "opsd")
TIMEOUT_S = 600
# Single-threaded Eigen: bit-stable float sums within a device (see pipeline_helpers.env).
EIGEN = "--xla_cpu_multi_thread_eigen=false"


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_pair(workdir, log_prefix):
  """Process 0 and 1 of 2, 4 CPU devices each; output to files (no pipe to fill)."""
  port = free_port()
  procs = []
  for pid in range(2):
    env = helpers.env(XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {EIGEN}",
                      JAX_PLATFORMS="cpu", OPSD_COORDINATOR=f"localhost:{port}",
                      OPSD_NUM_PROCESSES="2", OPSD_PROCESS_ID=str(pid))
    out = open(f"{log_prefix}.{pid}.log", "w")
    procs.append(subprocess.Popen(helpers.command(helpers.TOY, workdir, *ARGS), cwd=helpers.REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    out.close()
  return procs


def finish(procs, timeout=TIMEOUT_S):
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    kill(procs)


def kill(procs):
  """SIGKILL each launched process's session (the run and its grader workers)."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def logs(log_prefix):
  return [open(f"{log_prefix}.{pid}.log").read() for pid in range(2)]


def wait_for_result(workdir, stage, procs, timeout=TIMEOUT_S):
  """Blocks until results.json (process 0's, renamed into place whole) holds `stage`'s
  evaluation: the stage trained, saved its final parameters and was evaluated."""
  path = os.path.join(workdir, "results.json")
  deadline = time.time() + timeout
  while time.time() < deadline:
    for p in procs:
      assert p.poll() is None, f"a process ended (exit {p.returncode}) before {stage} was done"
    if os.path.exists(path):
      with open(path) as f:
        if stage in json.load(f):
          return
    time.sleep(0.1)
  raise AssertionError(f"no {stage} result within {timeout} s")


@pytest.mark.slow  # a single-process run and 1.5 two-process runs of the tiny pipeline
def test_two_process_pipeline_resumes_and_equals_one_process(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  # Killed once SFT is done (final parameters saved, evaluated)...
  first = launch_pair(multi, tmp_path / "first")
  try:
    # ...meanwhile the single-process reference on 8 devices
    reference = subprocess.Popen(
        helpers.command(helpers.TOY, single, *ARGS), cwd=helpers.REPO,
        env=helpers.env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {EIGEN}",
                        JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_result(multi, "sft", first)
  finally:
    kill(first)
  # ...then rerun: SFT is skipped, the rest runs to the end on both processes.
  second = launch_pair(multi, tmp_path / "second")
  codes = finish(second)
  try:
    ref_out = reference.communicate(timeout=TIMEOUT_S)[0]
  finally:
    kill([reference])
  out = logs(tmp_path / "second")
  for pid in range(2):
    assert codes[pid] == 0, f"process {pid} exit {codes[pid]}:\n{out[pid][-4000:]}"
  assert reference.returncode == 0, ref_out[-4000:]

  # Resumed: SFT is not trained again. Progress lines come from process 0 only.
  assert "sft: already done" in out[0]
  assert "[eval rlvr]" in out[0] and "done in" in out[0]
  assert "[eval" not in out[1] and "done in" not in out[1] and "[rlvr" not in out[1]

  # One set of result files, written by process 0, no temporaries left by either process.
  for name in ("results.json", "results.md", "stages.png", "curves.png", "metrics.jsonl",
               "config.json"):
    assert (multi / name).is_file(), name
  assert not [f for f in os.listdir(multi) if ".tmp" in f]
  assert len(os.listdir(multi / "tb")) == 2  # one TensorBoard event file per launch: process 0's
  records = helpers.records(multi)
  for stage in STAGES:  # one record per step: nobody wrote twice, the resume dropped nothing
    steps = [r["step"] for r in records if r["stage"] == stage]
    assert steps == list(range(1, len(steps) + 1)) and steps, (stage, steps)

  # Equal to one process on 8 devices: the same evaluations, rollouts, decisions...
  want, got = (json.loads((d / "results.json").read_text()) for d in (single, multi))
  assert set(got) == set(want) == {"init", "data", *STAGES}
  assert got["data"] == want["data"]  # every process dropped the same rows
  for stage in ("init", *STAGES):
    for key in ("accuracy", "mean_length", "mean_length_correct", "mean_length_incorrect",
                "truncation_rate", "hesitation_mean_per_response", "settings"):
      assert json.dumps(got[stage][key]) == json.dumps(want[stage][key]), (stage, key)
  exact = ("reward/mean", "accuracy", "completions/mean_length", "groups/frac_zero_std",
           "trained_tokens", "opsd/selected_rows", "opsd/trained_tokens", "updates")
  want_records = helpers.records(single)
  assert [(r["stage"], r["step"]) for r in records] == \
      [(r["stage"], r["step"]) for r in want_records]
  for g, w in zip(records, want_records):
    for key in exact:
      assert g.get(key) == w.get(key), (g["stage"], g["step"], key)
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-4, atol=1e-6)
  # ...and final parameters equal up to the order of cross-process float sums.
  for stage in STAGES:
    w, g = helpers.final_params(single, stage), helpers.final_params(multi, stage)
    assert w.keys() == g.keys()
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-5, err_msg=f"{stage} {key}")


# --------------------------------------------------------------------------------------------
# Fast: per-process data = the process's block of each single-process batch
# --------------------------------------------------------------------------------------------


def _records(n):
  return [{"question": f"q{i}", "reference": f"r{i}", "answer": str(i)} for i in range(n)]


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(3, 50, rng.integers(1, 5))), list(rng.integers(3, 50,
                                                                            rng.integers(1, 9))))
          for _ in range(n)]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("count", [2, 4])
def test_record_batches_of_processes_concatenate_to_the_single_process_batches(count):
  source = _records(37)  # batches run across epoch boundaries
  whole = _take(data.record_batches(source, 8, seed=5), 12)
  parts = [_take(data.record_batches(source, 8, seed=5, shard=(i, count)), 12)
           for i in range(count)]
  for k, batch in enumerate(whole):
    assert [r for part in parts for r in part[k]] == batch
  # the iterator states agree across processes (the checkpoint stores process 0's)
  states = []
  for i in range(count):
    it = data.record_batches(source, 8, seed=5, shard=(i, count))
    _take(it, 3)
    states.append(it.get_state())
  assert all(s == states[0] for s in states)
  resumed = data.record_batches(source, 8, seed=5, shard=(1, count))
  resumed.set_state(states[0])
  assert next(resumed) == parts[1][3]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_batches_of_processes_concatenate_to_the_single_process_batches(packing):
  examples = _examples(41)
  make = lambda shard=None: data.sft_batches(examples, 8, 16, pad_id=0, packing=packing,  # noqa: E731
                                             seed=2, shard=shard)
  whole = _take(make(), 6)
  parts = [_take(make((i, 2)), 6) for i in range(2)]
  for k, batch in enumerate(whole):
    for key, value in batch.items():
      assert parts[0][k][key].shape[0] == 4
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), value,
                                    err_msg=f"batch {k} {key}")
  with pytest.raises(ValueError, match="multiple of the process count"):
    make((0, 3))
