"""Optimizer from the `optimizer` section of config.default_config(): optax adamw / adam / sgd,
a constant / cosine / linear schedule with linear warmup, global-norm gradient clipping.

The learning rate is injected as a hyperparameter so a step can log the rate it just used
(`current_learning_rate(opt_state)`) without carrying the schedule around.

Mixed precision (bf16 parameters): `optimizer.state_dtype="float32"` runs the whole chain (clip,
Adam moments, weight decay) in float32 on float32 casts of the gradients, and returns float32
updates, which `optax.apply_updates` adds to the parameters in float32 before casting back.
`optimizer.master_weights=True` also keeps a float32 copy of the parameters in the optimizer
state and applies the update there: the bf16 parameters are then the rounded master copy, so
updates smaller than half a bf16 ulp (lr 5e-6 on weights ~0.02 is below it) are not lost.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
STATE_DTYPES = ("param", "float32")  # optimizer state (moments) in the param dtype or float32


def make_schedule(opt_cfg, total_steps: int, learning_rate: float | None = None):
  """Learning rate as a function of the update count. `learning_rate` (if given and >= 0)
  overrides opt_cfg.learning_rate, as a stage's own learning_rate does."""
  peak = opt_cfg.learning_rate if learning_rate is None or learning_rate < 0 else learning_rate
  warmup = int(opt_cfg.warmup_steps)
  if opt_cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {opt_cfg.schedule!r}")
  if warmup < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup}")
  decay_steps = max(int(total_steps) - warmup, 1)
  if opt_cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif opt_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps)
  else:
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt_cfg, total_steps: int, learning_rate: float | None = None
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) (skipped when grad_clip <= 0), then the optimizer."""
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {opt_cfg.name!r}")
  schedule = make_schedule(opt_cfg, total_steps, learning_rate)
  if opt_cfg.name == "adamw":
    tx = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay)
  elif opt_cfg.name == "adam":
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=opt_cfg.b1,
                                              b2=opt_cfg.b2, eps=opt_cfg.eps)
  else:
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
  if opt_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), tx)
  state_dtype = opt_cfg.get("state_dtype", "param")
  master_weights = bool(opt_cfg.get("master_weights", False))
  if state_dtype not in STATE_DTYPES:
    raise ValueError(f"optimizer.state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
  if master_weights and state_dtype != "float32":
    raise ValueError("optimizer.master_weights needs optimizer.state_dtype='float32'")
  if state_dtype == "float32":
    tx = in_float32(tx, master_weights=master_weights)
  return tx


class Float32State(NamedTuple):
  """State of `in_float32`: the inner optimizer's (built on float32 params) and, with master
  weights, the float32 copy of the parameters (None otherwise)."""
  inner: Any
  master: Any


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def in_float32(inner: optax.GradientTransformation, *, master_weights: bool = False
               ) -> optax.GradientTransformation:
  """`inner` run in float32 whatever the parameter dtype: its state is initialised from float32
  params, it sees float32 gradients, and the updates come back in float32 (apply_updates adds
  them in float32, then casts to the parameter dtype). With master_weights the update is applied
  to a float32 master copy and the returned update moves each parameter exactly onto the master
  copy rounded to its dtype."""
  def init(params):
    params32 = _f32(params)
    return Float32State(inner=inner.init(params32), master=params32 if master_weights else None)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("in_float32: update needs params")
    base = state.master if master_weights else _f32(params)
    updates, inner_state = inner.update(_f32(grads), state.inner, base)
    if not master_weights:
      return updates, Float32State(inner_state, None)
    master = optax.apply_updates(base, updates)
    # p + (round(m) - p) in float32 is exactly round(m): both are values of p's dtype.
    to_master = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32)
                             - p.astype(jnp.float32), master, params)
    return to_master, Float32State(inner_state, master)

  return optax.GradientTransformation(init, update)


def current_learning_rate(opt_state):
  """The learning rate of the last update (from the injected hyperparameters), or NaN."""
  found = []

  def visit(node):
    hyperparams = getattr(node, "hyperparams", None)  # Inject(Stateful)HyperparamsState
    if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
      found.append(hyperparams["learning_rate"])
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)

  visit(opt_state)
  return jnp.asarray(found[0], jnp.float32) if found else jnp.float32(jnp.nan)
