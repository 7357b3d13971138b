"""What the three stage loops share: state set-up and resume, checkpoints, metrics, and the
non-finite guard. A stage loop is then only its own data flow (see sft.py, rlvr.py, opsd.py).

Resume contract: a checkpoint at step s holds the train state after s updates plus `extra`
(the data-iterator state, and whatever else the loop needs); the loop restarts at step s and
metrics.jsonl drops its records past s, so a resumed run equals an uninterrupted one. Bit for bit
on CPU with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false: with multi-threaded Eigen kernels an SFT
step's float sums were seen to differ in the last bit between two processes (tests/test_resume.py).

Preemption: SIGTERM (what a preemptible TPU VM gets before it goes) only sets a flag; after the
step in flight, `maybe_checkpoint` saves that step and raises Preempted, and the CLI exits 143.

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


_STAGE_IDS = {"sft": 1, "rlvr": 2, "opsd": 3}  # fixed: str hash() changes between processes


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


class StageLoop:
  """Set-up, resume, checkpointing and logging of one stage.

  teacher: keep a teacher copy of the trained parameters in the state (OPSD's frozen snapshot or
  EMA; with LoRA a copy of the adapters: OPSD asks for it only for the EMA teacher)."""

  def __init__(self, run, stage: str, params, *, total_steps: int, learning_rate: float,
               updates_per_step: int = 1, teacher: bool = False):
    self.run, self.stage, self.total_steps = run, stage, total_steps
    lora_section = run.cfg.get("lora")
    self.model_cfg = (run.model_cfg if lora_section is None
                      else lora.with_config(run.model_cfg, lora_section))
    # What the sampler gets: the run's, with the model config that applies the adapters.
    self.sampler = run.sampler.with_model(self.model_cfg)
    # The schedule counts optimizer updates: RLVR/OPSD make several per rollout batch.
    opt_cfg = run.cfg.optimizer
    if getattr(run.cfg, stage).warmup_steps >= 0:  # the stage's own warmup
      opt_cfg = ml_collections.ConfigDict(opt_cfg.to_dict())
      opt_cfg.warmup_steps = getattr(run.cfg, stage).warmup_steps
    self.optimizer = optim.make_optimizer(opt_cfg, total_steps * updates_per_step, learning_rate)
    rng = jax.random.fold_in(jax.random.key(run.cfg.seed), _STAGE_IDS[stage])
    if lora.enabled(self.model_cfg):
      adapters = lora.init_adapters(self.model_cfg, jax.random.fold_in(rng, 1 << 20), run.mesh)
      self.state = state_lib.create(adapters, self.optimizer, rng,
                                    adapters if teacher else None, model_cfg=self.model_cfg,
                                    mesh=run.mesh, base_params=params)
      self._base_fingerprint = _fingerprint(params)
    else:
      self.state = state_lib.create(params, self.optimizer, rng, params if teacher else None,
                                    model_cfg=run.model_cfg, mesh=run.mesh)
    section = getattr(run.cfg, stage)
    self.checkpoint_every = section.checkpoint_every
    self.ckpt_dir = os.path.abspath(os.path.join(run.stage_dir(stage), "ckpt"))
    self.ckpt = checkpoint.Checkpointer(self.ckpt_dir, keep=2)
    self.extra: dict[str, Any] = {}
    self.start_step = 0
    self.bar = None
    self.sigterm = _SigtermFlag()
    self._inject_nan_at = _nan_injection(stage)

  def resume(self) -> dict[str, Any]:
    """Restores the latest checkpoint of this stage, if any; returns its `extra` dict."""
    latest = self.ckpt.latest_step()
    if latest is None:
      self.run.logger.truncate_after(self.stage, 0)  # records of a run killed before its 1st save
      return {}
    base = self.state.base_params  # LoRA: not in the checkpoint (the stage's input)
    target = self.state.replace(base_params=None)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    try:
      state, self.extra = self.ckpt.restore(latest, target=target, target_shardings=shardings)
      self.state = state.replace(base_params=base)
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

  def model_params(self):
    """The parameters the model runs with now: with LoRA base + adapters (one tree, no copy)."""
    return lora.combine(self.state.base_params, self.state.params)

  def final_params(self):
    """The stage's output: the trained parameters; with LoRA merged into the base (a new tree)."""
    if self.state.base_params is None:
      return self.state.params
    return lora.merge(self.model_cfg, self.state.base_params, self.state.params, self.run.mesh)

  def steps(self):
    self.bar = metrics_lib.progress(self.total_steps, self.start_step, self.stage)
    for step in range(self.start_step, self.total_steps):
      if self._inject_nan_at == step + 1:
        self.state = self.state.replace(params=_with_nan(self.state.params))
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
        last = self.ckpt.latest_step()
        self.close()
        raise NonFiniteError(message + "; stopped (on_nonfinite='stop'); last good checkpoint: " +
                             (f"step {last} in {self.ckpt_dir}" if last is not None
                              else "none of this stage yet"))
      if parallel.is_primary():
        print("warning: " + message + " (skipped, on_nonfinite='skip')", flush=True)
    values["skipped_updates"] = int(self.state.skipped_steps)
    every = max(1, self.run.cfg.log_every)
    echo = not self.run.logger.interactive and (step % every == 0 or step == self.total_steps)
    self.run.logger.write(self.stage, step, values, echo=echo)
    if self.bar is not None:
      self.bar.update(1)
      shown = {k: values[k] for k in ("loss", "reward/mean", "completions/mean_length")
               if k in values}
      self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

  def maybe_checkpoint(self, step: int, extra_fn: Callable[[], dict[str, Any]]):
    """After update `step`: save when due, at the end of the stage, and when SIGTERM came (then
    raise Preempted: the caller exits and a rerun resumes from this step)."""
    due = self.checkpoint_every and step % self.checkpoint_every == 0
    # Multi-host: SIGTERM reaches the hosts at different moments; all must save the same step
    # (orbax saves are collective) and stop together.
    preempted = parallel.any_process(self.sigterm.received)
    if due or step == self.total_steps or preempted:
      extra = extra_fn()
      if self.state.base_params is not None:  # LoRA: the base is the stage's input, not saved
        extra[_BASE_FINGERPRINT] = self._base_fingerprint
      self.ckpt.save(step, self.state.replace(base_params=None), extra)
    if preempted:
      self.close()
      raise Preempted(f"{self.stage}: SIGTERM received; saved step {step} of {self.total_steps} "
                      f"in {self.ckpt_dir}; rerun the same command to resume")

  def close(self):
    """Waits for the checkpoint writes, puts SIGTERM's handler back; safe to call twice."""
    self.sigterm.restore()
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
