"""Reward shaping and advantages for GRPO-family RLVR, as pure array functions (jit-friendly).

Layout: rewards of one rollout batch are [P, G] (prompt-major, G samples per prompt), the order
`sampling.generate` returns rows in; flatten to [P * G] for the train step's `advantages [N]`.
"""
from __future__ import annotations

import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(rewards_G, scale: str = "group", eps: float = 1e-6):
  """A_i = (r_i - mean_g r) / (std_g r + eps) over the last axis (one group, or [..., G]).

  scale "none" (Dr. GRPO) only subtracts the group mean. std is the population std (ddof 0), as
  METHOD.md writes it. For "batch" scaling use `advantages`, which needs the whole batch.
  """
  if scale not in ("group", "none"):
    raise ValueError(f"group_advantages: scale must be 'group' or 'none' (use advantages() for "
                     f"'batch'), got {scale!r}")
  r = jnp.asarray(rewards_G, jnp.float32)
  centered = r - jnp.mean(r, axis=-1, keepdims=True)
  if scale == "none":
    return centered
  return centered / (jnp.std(r, axis=-1, keepdims=True) + eps)


def advantages(rewards_PG, scale: str = "group", eps: float = 1e-6):
  """Advantages [P, G] for a batch of groups: "group" / "none" as group_advantages; "batch" =
  group mean subtracted, divided by the std of all rewards of the batch."""
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"advantages: scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
  r = jnp.asarray(rewards_PG, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"advantages: rewards must be [P, G], got shape {r.shape}")
  if scale != "batch":
    return group_advantages(r, scale, eps)
  centered = r - jnp.mean(r, axis=-1, keepdims=True)
  return centered / (jnp.std(r) + eps)


def dynamic_sampling_mask(rewards_PG):
  """DAPO dynamic sampling: keep_P is False for groups whose rewards are all equal (their
  advantages, hence gradients, are zero). Returns (keep_P bool [P], frac_zero_std scalar)."""
  r = jnp.asarray(rewards_PG, jnp.float32)
  keep = jnp.max(r, axis=-1) > jnp.min(r, axis=-1)
  return keep, 1.0 - jnp.mean(keep.astype(jnp.float32))


def overlong_penalty(lengths_N, max_len: int, buffer: int, coef: float):
  """DAPO soft over-length penalty, lengths counted in tokens (never characters).

  0 up to max_len - buffer, then falling linearly to -coef at max_len (and beyond). With
  buffer 0 it is a hard -coef on completions that reach max_len (i.e. were truncated).
  """
  if buffer < 0 or buffer > max_len:
    raise ValueError(f"overlong_penalty: buffer must be in [0, max_len={max_len}], got {buffer}")
  lengths = jnp.asarray(lengths_N, jnp.float32)
  if buffer == 0:
    return jnp.where(lengths >= max_len, -coef, 0.0).astype(jnp.float32)
  over = jnp.clip((lengths - (max_len - buffer)) / buffer, 0.0, 1.0)
  return (-coef * over).astype(jnp.float32)


def mask_truncated(completion_mask_NC, finished_N):
  """Zeroes the trained tokens of completions that hit the length limit without finishing."""
  return completion_mask_NC * jnp.asarray(finished_N, completion_mask_NC.dtype)[:, None]


def reward_metrics(rewards_PG) -> dict:
  r = jnp.asarray(rewards_PG, jnp.float32)
  keep, frac_zero_std = dynamic_sampling_mask(r)
  return {"reward/mean": jnp.mean(r), "reward/std": jnp.std(r),
          "groups/frac_zero_std": frac_zero_std}
