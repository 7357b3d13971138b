"""Rewards, reward shaping and advantages for GRPO-family RLVR, as pure array functions.

Layout: rewards of one rollout batch are [P, G] (prompt-major, G samples per prompt), the order
`sampling.generate` returns rows in; flatten to [P * G] for the train step's `advantages [N]`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ADVANTAGE_SCALES = ("group", "batch", "none")
# rlvr.dynamic_sampling: "off" trains every group; "mask" zeroes the trained tokens of groups whose
# rewards are all equal; "refill" (DAPO) drops them and samples further prompts until the batch
# holds prompts_per_step groups with mixed rewards (select_informative, refill_indices).
DYNAMIC_SAMPLING = ("off", "mask", "refill")


def rewards(correct_N, answered_N, lengths_N, *, max_len: int, format_reward: float = 0.0,
            overlong_buffer: int = 0, overlong_coef: float = 0.0) -> np.ndarray:
  """Rewards [N] (float32, host): 1 for a correct answer, plus format_reward where an answer was
  extracted at all, plus the DAPO over-length penalty (overlong_penalty, in tokens)."""
  r = np.asarray(correct_N).astype(np.float32)
  if format_reward:
    r = r + format_reward * np.asarray(answered_N, np.float32)
  if overlong_coef:
    r = r + np.asarray(overlong_penalty(lengths_N, max_len, overlong_buffer, overlong_coef))
  return r


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


def select_informative(informative_rounds, num_groups: int) -> tuple[np.ndarray, int]:
  """DAPO's batch from rounds of sampled groups: the first `num_groups` informative groups (mixed
  rewards) in sampling order, the surplus of the last round dropped.

  informative_rounds: one bool [P_r] per sampling round (dynamic_sampling_mask's keep). Returns
  (groups int [num_groups], shortfall): groups indexes the groups of all rounds concatenated in
  order; where fewer than num_groups were informative (the refill cap was hit), the last
  `shortfall` slots hold uninformative groups, the earliest sampled, for the caller to mask, so
  the batch keeps its shape.
  """
  flags = np.concatenate([np.asarray(k, bool).reshape(-1) for k in informative_rounds])
  good = np.flatnonzero(flags)[:num_groups]
  shortfall = num_groups - len(good)
  filler = np.flatnonzero(~flags)[:shortfall]
  if len(filler) < shortfall:
    raise ValueError(f"select_informative: {len(flags)} groups sampled, {num_groups} needed")
  return np.concatenate([good, filler]).astype(np.int64), int(shortfall)


def refill_indices(num_records: int, count: int, *, seed: int, step: int, round_: int
                   ) -> np.ndarray:
  """Record indices of refill round `round_` (>= 1) of `step`: `count` distinct records (with
  replacement only if there are fewer), a pure function of (seed, step, round_). The stage's
  prompt iterator, whose position a checkpoint saves, is never touched, so a resumed run draws
  the same refill prompts."""
  rng = np.random.default_rng((seed, step, round_))
  return rng.choice(num_records, size=count, replace=count > num_records)


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
  """Zeroes the trained tokens of completions that hit the length limit without finishing (numpy
  in, numpy out: the loop's host batches)."""
  return completion_mask_NC & np.asarray(finished_N, bool)[:, None]
