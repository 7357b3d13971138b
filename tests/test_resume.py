"""Exact resume of every stage after SIGKILL (a lost VM) and SIGTERM (a preemption notice).

Each test runs the tiny pipeline of pipeline_helpers through the CLI and interrupts it once in
every stage (SFT, RLVR, OPSD), alternating the signals, rerunning the same command each time.
The finished run must equal the uninterrupted reference run bit for bit: final parameters of
every stage, every metrics record and every evaluation (CPU is deterministic), which needs the
data-iterator position, RNG, optimizer state, step, OPSD teacher snapshot and the results of
evaluations already done restored. SIGTERM must end the run with exit 143 after saving the step
in flight; SIGKILL loses the work since the last periodic checkpoint, which is redone.
"""
from __future__ import annotations

import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline_helpers import STEPS, TINY, TOY, assert_ok, assert_same_run, interrupt, \
    reference_run, run

# (stage, the step whose record triggers the signal, signal): one interruption per stage, each
# signal in each stage across the two chains. Checkpoints: SFT every 2 of 6, RLVR every 2 of 5,
# OPSD every step of 3; so SIGKILL after SFT step 3 loses a step, SIGTERM after RLVR step 1 saves
# a step no periodic checkpoint would.
CHAINS = {
    "term-sft_kill-rlvr_term-opsd": [("sft", 3, signal.SIGTERM), ("rlvr", 3, signal.SIGKILL),
                                     ("opsd", 1, signal.SIGTERM)],
    "kill-sft_term-rlvr_kill-opsd": [("sft", 3, signal.SIGKILL), ("rlvr", 1, signal.SIGTERM),
                                     ("opsd", 2, signal.SIGKILL)],
}


def _saved_steps(workdir, stage):
  directory = os.path.join(workdir, stage, "ckpt")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _check_interrupted(workdir, stage, sig, code, stderr):
  """The run ended as `sig` should make it end; returns the step a rerun must resume from."""
  assert not os.path.exists(os.path.join(workdir, stage, "final")), \
      f"the signal came after {stage} had finished"
  if sig == signal.SIGKILL:
    assert code == -signal.SIGKILL, (code, stderr[-2000:])
    return _saved_steps(workdir, stage)[-1] if os.path.isdir(
        os.path.join(workdir, stage, "ckpt")) else None
  assert code == 143, (code, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("preempted:")]
  assert len(lines) == 1, stderr[-3000:]
  saved = int(re.search(rf"{stage}: SIGTERM received; saved step (\d+) of {STEPS[stage]}",
                        lines[0]).group(1))
  assert saved == _saved_steps(workdir, stage)[-1], (saved, _saved_steps(workdir, stage))
  return saved


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_interrupt_every_stage_then_rerun_equals_uninterrupted(chain, tmp_path_factory,
                                                               tmp_path):
  reference, _, _ = reference_run(tmp_path_factory)
  workdir = tmp_path / "run"
  expected = None  # (stage, step) the next process must say it resumed from
  for i, (stage, step, sig) in enumerate(CHAINS[chain]):
    code, stdout, stderr = interrupt(TOY, workdir, *TINY, stage=stage, step=step, sig=sig,
                                     log_prefix=str(tmp_path / f"run{i}"))
    if expected is not None:
      assert f"{expected[0]}: resumed from step {expected[1]}" in stdout, stdout[-2000:]
    resume_step = _check_interrupted(workdir, stage, sig, code, stderr)
    expected = None if resume_step is None else (stage, resume_step)
  proc, _ = run(TOY, workdir, *TINY)
  assert_ok(proc)
  if expected is not None:
    assert f"{expected[0]}: resumed from step {expected[1]}" in proc.stdout, proc.stdout[-2000:]
  assert_same_run(workdir, reference)


# --------------------------------------------------------------------------------------------
# The stage skeleton itself (train/loop.py StageLoop.train), in-process
# --------------------------------------------------------------------------------------------


class _Counter:
  """A resumable data iterator yielding 0, 1, 2, ..."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return self.i - 1

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _stage_run(tmp_path):
  from opsd_jax import metrics, parallel, pipeline, rollouts
  from opsd_jax.config import default_config
  import helpers

  c = default_config()
  c.opsd.steps, c.opsd.checkpoint_every = 3, 2
  cfg = helpers.tiny_config()
  mesh = helpers.single_device()
  params = jax.device_put(helpers.init_params(cfg), parallel.param_shardings(cfg, mesh))
  sampler = rollouts.Sampler.build(cfg, mesh, None, None, None, c.sampling)
  run_ = pipeline.Run(c, str(tmp_path), cfg, mesh, None, None, [], {},
                      metrics.Logger(str(tmp_path), tensorboard=False), None, sampler)
  return run_, params


def _run_stage(run_, params, teacher):
  from opsd_jax.train import loop

  lp = loop.StageLoop(run_, "opsd", params, total_steps=3, learning_rate=1e-2, teacher=teacher)
  seen = []

  def body(step, batch):
    seen.append((step, batch, lp.carry["count"]))
    lp.state = lp.state.replace(step=lp.state.step + 1)
    lp.carry["count"] += 10
    return {"loss": jnp.float32(batch) / 2, "nonfinite": jnp.float32(0)}

  return lp, lp.train(_Counter(), body, carry={"count": 0}), seen


@pytest.mark.parametrize("teacher", ["frozen", "ema"])
def test_stage_loop_records_every_step_and_resumes_data_carry_and_teacher(tmp_path, teacher):
  """StageLoop.train: one record per step with the step's own values (read one step late),
  checkpoints every 2 steps and at the end with the data position and the carry; a frozen
  teacher is not in the checkpoint (rebuilt from the stage's input on resume), an EMA one is."""
  from opsd_jax import checkpoint

  run_, params = _stage_run(tmp_path)
  lp, out, seen = _run_stage(run_, params, teacher)
  assert out is lp.state.params
  assert seen == [(0, 0, 0), (1, 1, 10), (2, 2, 20)]
  rows = run_.logger.records("opsd")
  assert [(r["step"], r["loss"], r["skipped_updates"]) for r in rows] == [
      (1, 0.0, 0), (2, 0.5, 0), (3, 1.0, 0)]
  assert checkpoint.latest_step(lp.ckpt_dir) == 3
  stored, extra = checkpoint.restore(lp.ckpt_dir, 2)
  assert extra["data"] == {"i": 2} and extra["count"] == 20
  assert (stored.get("teacher_params") is None) == (teacher == "frozen")

  shutil.rmtree(f"{lp.ckpt_dir}/3")  # as if killed after step 2's checkpoint
  again, _, seen = _run_stage(run_, params, teacher)
  assert seen == [(2, 2, 20)] and again.start_step == 2
  for got, want in zip(jax.tree.leaves(again.state.teacher_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  assert [(r["step"], r["loss"]) for r in run_.logger.records("opsd")] == [
      (1, 0.0), (2, 0.5), (3, 1.0)]
