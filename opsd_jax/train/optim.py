"""Optimizer from the `optimizer` section of config.default_config(): optax adamw / adam / sgd,
a constant / cosine / linear schedule with linear warmup, global-norm gradient clipping.

The learning rate is injected as a hyperparameter so a step can log the rate it just used
(`current_learning_rate(opt_state)`) without carrying the schedule around.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


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
  return tx


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
