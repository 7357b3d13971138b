"""What the three stage loops share: state set-up and resume, checkpoints, metrics, and the
non-finite guard. A stage loop is then only its own data flow (see sft.py, rlvr.py, opsd.py).

Resume contract: a checkpoint at step s holds the train state after s updates plus `extra`
(the data-iterator state, and whatever else the loop needs); the loop restarts at step s and
metrics.jsonl drops its records past s, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from opsd_jax import checkpoint, metrics as metrics_lib
from opsd_jax.train import optim
from opsd_jax.train import state as state_lib


_STAGE_IDS = {"sft": 1, "rlvr": 2, "opsd": 3}  # fixed: str hash() changes between processes


class NonFiniteError(FloatingPointError):
  """Loss or gradient not finite; names the stage, step and quantity."""


class StageLoop:
  """Set-up, resume, checkpointing and logging of one stage."""

  def __init__(self, run, stage: str, params, *, total_steps: int, learning_rate: float,
               updates_per_step: int = 1, teacher_params=None):
    self.run, self.stage, self.total_steps = run, stage, total_steps
    # The schedule counts optimizer updates: RLVR/OPSD make several per rollout batch.
    self.optimizer = optim.make_optimizer(run.cfg.optimizer, total_steps * updates_per_step,
                                          learning_rate)
    rng = jax.random.fold_in(jax.random.key(run.cfg.seed), _STAGE_IDS[stage])
    self.state = state_lib.create(params, self.optimizer, rng, teacher_params,
                                  model_cfg=run.model_cfg, mesh=run.mesh)
    section = getattr(run.cfg, stage)
    self.checkpoint_every = section.checkpoint_every
    self.ckpt = checkpoint.Checkpointer(os.path.join(run.stage_dir(stage), "ckpt"), keep=2)
    self.extra: dict[str, Any] = {}
    self.start_step = 0
    self.bar = None

  def resume(self) -> dict[str, Any]:
    """Restores the latest checkpoint of this stage, if any; returns its `extra` dict."""
    latest = self.ckpt.latest_step()
    if latest is None:
      return {}
    shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.state, self.extra = self.ckpt.restore(latest, target=self.state,
                                               target_shardings=shardings)
    self.start_step = latest
    self.run.logger.truncate_after(self.stage, latest)
    print(f"{self.stage}: resumed from step {latest}", flush=True)
    return self.extra

  def steps(self):
    self.bar = metrics_lib.progress(self.total_steps, self.start_step, self.stage)
    for step in range(self.start_step, self.total_steps):
      yield step
    self.bar.close()

  def next_rng(self, step: int) -> jax.Array:
    """A key for this step's sampling, a function of (stage seed, step) alone: resumes repeat it."""
    return jax.random.fold_in(self.state.rng, step)

  def log(self, step: int, values: dict[str, Any]):
    """Records the metrics of update `step` (1-based count of updates done), checks finiteness."""
    values = {k: np.asarray(v).item() if np.ndim(v) == 0 else v for k, v in values.items()}
    if values.get("nonfinite", 0.0) > 0:
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(values.get(k, 0.0))]
      message = (f"{self.stage} step {step}: non-finite {', '.join(bad) or 'values'} "
                 f"({', '.join(f'{k}={values.get(k)}' for k in ('loss', 'grad_norm'))}); "
                 f"the update was not applied")
      if self.run.cfg.on_nonfinite == "stop":
        raise NonFiniteError(message + f"; last good checkpoint: step "
                                       f"{self.ckpt.latest_step()} in {self.ckpt.directory}")
      print("warning: " + message + " (skipped, on_nonfinite='skip')", flush=True)
    every = max(1, self.run.cfg.log_every)
    echo = not self.run.logger.interactive and (step % every == 0 or step == self.total_steps)
    self.run.logger.write(self.stage, step, values, echo=echo)
    if self.bar is not None:
      self.bar.update(1)
      shown = {k: values[k] for k in ("loss", "reward/mean", "completions/mean_length")
               if k in values}
      self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

  def maybe_checkpoint(self, step: int, extra_fn: Callable[[], dict[str, Any]]):
    """After update `step`: save when due, and always at the end of the stage."""
    due = self.checkpoint_every and step % self.checkpoint_every == 0
    if due or step == self.total_steps:
      self.ckpt.save(step, self.state, extra_fn())

  def close(self):
    self.ckpt.close()
