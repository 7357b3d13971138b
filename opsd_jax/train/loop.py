"""The skeleton of every stage: state set-up and resume, the step loop, metrics, checkpoints,
the non-finite guard, preemption and the stage's output. A stage file builds a StageLoop, its step
functions and its data iterator, and hands `StageLoop.train` the body of one step (collect and
update); it never touches checkpoints, logs or resume (see sft.py, rlvr.py, opsd.py).

Metrics are read one step late: `train` dispatches step N + 1 before it pulls step N's metrics to
the host, so a stage whose body does not itself wait on the device (SFT) keeps the device queue
full instead of draining it every step. A step a checkpoint is due at is read at once, before
the save: a checkpoint never holds a step whose metrics were not checked, and the records, the
checks and the checkpoints are those of a loop that reads every step at once.

Resume contract: a checkpoint at step s holds the train state after s updates plus `extra`
(the data-iterator state, and whatever else the loop needs); the loop restarts at step s and
metrics.jsonl drops its records past s, so a resumed run equals an uninterrupted one. Bit for bit
on CPU with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false: with multi-threaded Eigen kernels an SFT
step's float sums were seen to differ in the last bit between two processes (tests/test_resume.py).

Preemption: SIGTERM (what a preemptible TPU VM gets before it goes) only sets a flag; after the
step in flight, `train` saves that step and raises Preempted, and the CLI exits 143.

OPSD teacher: an EMA teacher is part of the checkpoint; a frozen teacher is the stage's input,
which a rerun rebuilds the same way, so it is copied again on resume instead of being saved.

LoRA (cfg.lora.rank > 0): the stage trains fresh adapters on the parameters it was given (the
base, frozen, held once in state.base_params), samples with base + adapters in the forward, and
returns the merged parameters (`final_params`). Checkpoints hold the adapters and optimizer state,
not the base: the base is the stage's input, which a rerun rebuilds the same way (the previous
stage's final parameters, or the initial ones); a fingerprint of it in the checkpoint's extra
catches a base that changed in between.

Fault injection for tests: OPSD_JAX_INJECT_NAN="<stage>:<update>" writes a NaN into the first
parameter just before that update (1-based) of that stage, so the real step sees a non-finite loss
and gradient and the real guard and loop handle it.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opsd_jax import checkpoint, lora, metrics as metrics_lib, parallel
from opsd_jax.train import optim
from opsd_jax.train import state as state_lib
from opsd_jax.train import steps as steps_lib


_STAGE_IDS = {"sft": 1, "rlvr": 2, "opsd": 3}  # fixed: str hash() changes between processes
# on_nonfinite: stop (keep the last good checkpoint, exit 1) or skip the update and count it.
ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
  """Loss or gradient not finite; names the stage, step and quantity."""


class Preempted(RuntimeError):
  """SIGTERM arrived during a stage; a checkpoint of the last finished step was saved."""


INJECT_NAN_ENV = "OPSD_JAX_INJECT_NAN"


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps (only the main thread may install
  signal handlers; elsewhere, e.g. in a test's worker thread, SIGTERM keeps its default)."""

  def __init__(self):
    self.received = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _nan_injection(stage: str) -> int | None:
  """The update (1-based) before which to poison the params, from OPSD_JAX_INJECT_NAN."""
  spec = os.environ.get(INJECT_NAN_ENV, "")
  if not spec:
    return None
  name, _, update = spec.partition(":")
  if not update.isdigit():
    raise ValueError(f"{INJECT_NAN_ENV} must look like 'sft:3', got {spec!r}")
  return int(update) if name == stage else None


def _with_nan(params):
  """params with element 0 of the first leaf set to NaN, on the same devices and shardings."""
  leaves, treedef = jax.tree.flatten(params)
  first = leaves[0]
  poisoned = first.at[(0,) * first.ndim].set(jax.numpy.nan)
  leaves[0] = jax.device_put(poisoned, first.sharding)
  return jax.tree.unflatten(treedef, leaves)


_BASE_FINGERPRINT = "lora_base_fingerprint"


def _fingerprint(params) -> float:
  """Sum of |w| over all parameters: a cheap check that a resumed LoRA stage has its old base."""
  return float(jax.jit(lambda t: sum(jnp.sum(jnp.abs(x.astype(jnp.float32)))
                                     for x in jax.tree.leaves(t)))(params))


def _optimizer(cfg, stage: str, updates: int, learning_rate: float):
  """The stage's optimizer; its schedule counts optimizer updates (RLVR/OPSD make several per
  rollout batch) and takes the stage's own warmup when it sets one (>= 0)."""
  opt_cfg = cfg.optimizer
  if getattr(cfg, stage).warmup_steps >= 0:
    opt_cfg = ml_collections.ConfigDict(opt_cfg.to_dict())
    opt_cfg.warmup_steps = getattr(cfg, stage).warmup_steps
  return optim.make_optimizer(opt_cfg, updates, learning_rate)


class StageLoop:
  """One stage's state, checkpoints and metrics around the stage's step body (`train`).

  teacher: the OPSD teacher kind (steps.TEACHERS) or None; steps.teacher_copy decides whether
  the state holds a copy of it, steps.teacher_in_checkpoint whether that copy is saved.
  shardings: the stage's parameter shardings (state.ParamShardings), computed once here; pass
  them to the stage's step and score functions."""

  def __init__(self, run, stage: str, params, *, total_steps: int, learning_rate: float,
               updates_per_step: int = 1, teacher: str | None = None):
    self.run, self.stage, self.total_steps = run, stage, total_steps
    lora_section = run.cfg.get("lora")
    self.model_cfg = (run.model_cfg if lora_section is None
                      else lora.with_config(run.model_cfg, lora_section))
    # What the sampler gets: the run's, with the model config that applies the adapters; its
    # shardings are the stage's, computed once.
    self.sampler = (run.sampler if run.sampler.model_cfg == self.model_cfg
                    else run.sampler.with_model(self.model_cfg))
    self.shardings = state_lib.param_shardings(self.model_cfg, run.mesh,
                                               self.sampler.param_shardings)
    self.optimizer = _optimizer(run.cfg, stage, total_steps * updates_per_step, learning_rate)
    rng = jax.random.fold_in(jax.random.key(run.cfg.seed), _STAGE_IDS[stage])
    uses_lora = lora.enabled(self.model_cfg)
    copy = steps_lib.teacher_copy(teacher, uses_lora)
    self._save_teacher = copy and steps_lib.teacher_in_checkpoint(teacher)
    if uses_lora:
      adapters = lora.init_adapters(self.model_cfg, jax.random.fold_in(rng, 1 << 20), run.mesh,
                                    shardings=self.shardings.trained)
      self.state = state_lib.create(adapters, self.optimizer, rng, adapters if copy else None,
                                    model_cfg=self.model_cfg, mesh=run.mesh, base_params=params,
                                    shardings=self.shardings)
      self._base_fingerprint = _fingerprint(params)
    else:
      self.state = state_lib.create(params, self.optimizer, rng, params if copy else None,
                                    model_cfg=run.model_cfg, mesh=run.mesh,
                                    shardings=self.shardings)
    section = getattr(run.cfg, stage)
    self.checkpoint_every = section.checkpoint_every
    self.ckpt_dir = os.path.abspath(os.path.join(run.stage_dir(stage), "ckpt"))
    self.ckpt = checkpoint.Checkpointer(self.ckpt_dir, keep=2)
    self.extra: dict[str, Any] = {}
    self.carry: dict[str, Any] = {}
    self.start_step = 0
    self.bar = None
    self.sigterm = _SigtermFlag()
    self._inject_nan_at = _nan_injection(stage)

  # ------------------------------------------------------------------------------------------
  # The loop
  # ------------------------------------------------------------------------------------------

  def train(self, batches, body: Callable[[int, Any], dict[str, Any]],
            carry: dict[str, Any] | None = None):
    """Runs the stage to its last step and returns its output parameters (final_params).

    batches: the stage's data iterator (next(), get_state(), set_state()); its position is
    saved with every checkpoint. body(step, batch) -> metrics: one step (0-based) of collect
    and update on `self.state`; metrics may be device arrays, read one step later. carry:
    small JSON values the body keeps across steps in `self.carry` (e.g. a running count),
    saved with every checkpoint and restored on resume."""
    self.carry = dict(carry or {})
    try:
      extra = self.resume()
      if extra:
        batches.set_state(extra["data"])
        self.carry.update({k: extra[k] for k in self.carry if k in extra})
      pending = None  # (update count, metrics) dispatched but not yet read
      for step in self.steps():
        # The skip count as of this update: a copy, as the next step donates the state's buffer.
        values = dict(body(step, next(batches)),
                      skipped_updates=jnp.copy(self.state.skipped_steps))
        if pending is not None:  # step + 1 is queued: read the one before
          self.log(*pending)
        pending = (step + 1, values)
        due, preempted = self._save_due(step + 1)
        if due:
          self.log(*pending)
          pending = None
          self.save(step + 1, {"data": batches.get_state(), **self.carry})
        if preempted:
          raise Preempted(f"{self.stage}: SIGTERM received; saved step {step + 1} of "
                          f"{self.total_steps} in {self.ckpt_dir}; rerun the same command to "
                          "resume")
    finally:
      self.close()
    return self.final_params()

  def steps(self):
    """0-based steps from the resumed one to the last (the NaN injection happens here)."""
    self.bar = metrics_lib.progress(self.total_steps, self.start_step, self.stage)
    for step in range(self.start_step, self.total_steps):
      if self._inject_nan_at == step + 1:
        self.state = self.state.replace(params=_with_nan(self.state.params))
      yield step

  def next_rng(self, step: int) -> jax.Array:
    """A key for this step's sampling, a function of (stage seed, step) alone: resumes repeat it."""
    return jax.random.fold_in(self.state.rng, step)

  # ------------------------------------------------------------------------------------------
  # Resume and checkpoints
  # ------------------------------------------------------------------------------------------

  def _saved_state(self, state):
    """What a checkpoint holds of a state: no LoRA base and no frozen teacher (both are the
    stage's input, rebuilt by a rerun)."""
    state = state.replace(base_params=None)
    return state if self._save_teacher else state.replace(teacher_params=None)

  def resume(self) -> dict[str, Any]:
    """Restores the latest checkpoint of this stage, if any; returns its `extra` dict."""
    latest = self.ckpt.latest_step()
    if latest is None:
      self.run.logger.truncate_after(self.stage, 0)  # records of a run killed before its 1st save
      return {}
    fresh = self.state  # LoRA base and frozen teacher: not in the checkpoint (the stage's input)
    target = self._saved_state(fresh)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    try:
      state, self.extra = self.ckpt.restore(latest, target=target, target_shardings=shardings)
      self.state = state.replace(
          base_params=fresh.base_params,
          teacher_params=state.teacher_params if self._save_teacher else fresh.teacher_params)
      self._check_base(latest)
    except checkpoint.CheckpointError as e:
      self.close()
      reason = " ".join(str(e).split())  # orbax/tensorstore details run to pages: keep the head
      reason = reason if len(reason) <= 300 else reason[:300] + " ..."
      raise checkpoint.CheckpointError(
          f"{self.stage}: cannot resume: {reason} (delete "
          f"{os.path.join(self.ckpt_dir, str(latest))} to resume from an earlier step, or the "
          "whole directory to restart the stage)") from e
    self.start_step = latest
    self.run.logger.truncate_after(self.stage, latest)
    if parallel.is_primary():
      print(f"{self.stage}: resumed from step {latest}", flush=True)
    return self.extra

  def _check_base(self, step):
    saved = self.extra.get(_BASE_FINGERPRINT)
    if self.state.base_params is None or saved is None:
      return
    if not np.isclose(saved, self._base_fingerprint, rtol=1e-5):
      raise checkpoint.CheckpointError(
          f"checkpoint {step} trained LoRA adapters on other base parameters than this "
          f"stage's input (fingerprint {saved} vs {self._base_fingerprint})")

  def _save_due(self, step: int) -> tuple[bool, bool]:
    """(save after update `step`, SIGTERM came): saves are due every checkpoint_every updates,
    at the end of the stage, and on SIGTERM (the caller then stops; a rerun resumes there)."""
    due = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
    # Multi-host: SIGTERM reaches the hosts at different moments; all must save the same step
    # (orbax saves are collective) and stop together.
    preempted = parallel.any_process(self.sigterm.received)
    return due or step == self.total_steps or preempted, preempted

  def save(self, step: int, extra: dict[str, Any]):
    """Checkpoints the state after update `step` with `extra` (JSON: the data position...)."""
    extra = dict(extra)
    if self.state.base_params is not None:  # LoRA: the base is the stage's input, not saved
      extra[_BASE_FINGERPRINT] = self._base_fingerprint
    self.ckpt.save(step, self._saved_state(self.state), extra)

  # ------------------------------------------------------------------------------------------
  # Parameters, metrics, closing
  # ------------------------------------------------------------------------------------------

  def model_params(self):
    """The parameters the model runs with now: with LoRA base + adapters (one tree, no copy)."""
    return lora.combine(self.state.base_params, self.state.params)

  def final_params(self):
    """The stage's output: the trained parameters; with LoRA merged into the base (a new tree)."""
    if self.state.base_params is None:
      return self.state.params
    return lora.merge(self.model_cfg, self.state.base_params, self.state.params, self.run.mesh,
                      out_shardings=self.shardings.base)

  def log(self, step: int, values: dict[str, Any]):
    """Records the metrics of update `step` (1-based count of updates done), checks finiteness."""
    values = {k: np.asarray(v).item() if np.ndim(v) == 0 else v for k, v in values.items()}
    if values.get("nonfinite", 0.0) > 0:
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(values.get(k, 0.0))]
      message = (f"{self.stage} step {step}: non-finite {', '.join(bad) or 'values'} "
                 f"({', '.join(f'{k}={values.get(k)}' for k in ('loss', 'grad_norm'))}); "
                 f"the update was not applied")
      if self.run.cfg.on_nonfinite == "stop":
        last = self.ckpt.latest_step()
        self.close()
        raise NonFiniteError(message + "; stopped (on_nonfinite='stop'); last good checkpoint: " +
                             (f"step {last} in {self.ckpt_dir}" if last is not None
                              else "none of this stage yet"))
      if parallel.is_primary():
        print("warning: " + message + " (skipped, on_nonfinite='skip')", flush=True)
    values["skipped_updates"] = int(values.pop("skipped_updates", self.state.skipped_steps))
    every = max(1, self.run.cfg.log_every)
    echo = not self.run.logger.interactive and (step % every == 0 or step == self.total_steps)
    self.run.logger.write(self.stage, step, values, echo=echo)
    if self.bar is not None:
      self.bar.update(1)
      shown = {k: values[k] for k in ("loss", "reward/mean", "completions/mean_length")
               if k in values}
      self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

  def close(self):
    """Waits for the checkpoint writes, puts SIGTERM's handler back, closes the progress bar;
    safe to call twice."""
    self.sigterm.restore()
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.ckpt is not None:
      self.ckpt.close()
      self.ckpt = None


def split_rows(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
  """Consecutive mini-batches of a host batch (config validation makes `parts` divide it)."""
  n = len(next(iter(batch.values())))
  size = n // parts
  return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def mean_metrics(items: list[dict[str, Any]]) -> dict[str, float]:
  """Mean of each metric over the updates of one step ({} when there were none)."""
  keys = items[0].keys() if items else []
  return {k: float(np.mean([np.asarray(m[k]) for m in items])) for k in keys}
