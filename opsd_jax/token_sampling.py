"""How a token is drawn from a row's logits: greedy, or temperature with top-k and top-p.

One interface, `TokenSampler.get_next_tokens(logits_BV, u_B)`, as gemma's `SamplingMethod`, with
one difference: it takes one uniform per row, not an RNG key. The decode loop draws every
(row, token) uniform before it starts, so a step does no RNG work and a row's samples depend on
the key alone, not on the slot or step it ran in.

Sampling never calls `jax.random.categorical` (Gumbel noise over the whole vocabulary costs more
than the rest of a small model's decode step on CPU): one uniform per row and an inverse CDF,
done in two levels (pick a block of the vocabulary by its mass, then a token inside it). Top-k
(k <= 64) extracts the k best exactly with a per-block maximum tournament, never sorting the
vocabulary (XLA's CPU sort / `lax.top_k` are far slower at a sampler's batch x vocabulary);
larger k and top-p without top-k find their threshold by bisection on the float bit pattern.
Bench: `python bench/sampler.py --only ours`.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

_TOURNAMENT_MAX_K = 64   # above this, top-k by bisection (the tournament is k sequential steps)
_BLOCK = 128             # vocabulary block for the two-level inverse CDF and the tournament


class TokenSampler(Protocol):
  """Draws one token per row. Implementations are frozen dataclasses: hashable, so the decode
  loop's jit takes them as static arguments."""

  def get_next_tokens(self, logits_BV, u_B):
    """(token_B int32, logprob_B under the distribution sampled from (0 for greedy),
    learner_logprob_B = untruncated log_softmax(logits / T) at the token, T = 1 for greedy)."""


@dataclasses.dataclass(frozen=True)
class Greedy:
  """The most likely token; u_B unused."""

  def get_next_tokens(self, logits_BV, u_B):
    del u_B
    logits_BV = logits_BV.astype(jnp.float32)
    B = logits_BV.shape[0]
    token = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    learner = _gather(logits_BV, token) - jax.nn.logsumexp(logits_BV, -1)
    return token, jnp.zeros((B,), jnp.float32), learner


@dataclasses.dataclass(frozen=True)
class Sampled:
  """A draw from softmax(logits / temperature), truncated to the top_k most likely tokens
  (0 = off) and then to the smallest highest-first set of mass >= top_p (1 = off; HF's rule)."""
  temperature: float
  top_k: int = 0
  top_p: float = 1.0

  def get_next_tokens(self, logits_BV, u_B):
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[1]
    top_k, top_p = self.top_k, self.top_p
    scaled = logits_BV / self.temperature
    learner_norm = jax.nn.logsumexp(scaled, -1)
    k = min(top_k, V) if top_k > 0 else 0
    if 0 < k <= _TOURNAMENT_MAX_K:
      vals, idxs = _top_k_tournament(scaled, k)  # sorted: top-p is a prefix rule on them
      if top_p < 1.0:
        probs = jax.nn.softmax(vals, -1)
        mass_above = jnp.cumsum(probs, -1) - probs
        vals = jnp.where(mass_above < top_p, vals, -jnp.inf)
      choice = _inverse_cdf(jnp.exp(vals - vals[:, :1]), u_B)
      token = _gather(idxs, choice)
      logprob = _gather(vals, choice) - jax.nn.logsumexp(vals, -1)
    else:
      kept = scaled
      if k:
        key = _ordered_key(scaled)
        kth = _largest_key_where(key, lambda m: m.sum(-1) >= k)
        kept = jnp.where(key >= kth[:, None], scaled, -jnp.inf)
      if top_p < 1.0:
        kept = jnp.where(_keep_top_p(kept, top_p), kept, -jnp.inf)
      token = _inverse_cdf(jnp.exp(kept - kept.max(-1, keepdims=True)), u_B).astype(jnp.int32)
      norm = learner_norm if kept is scaled else jax.nn.logsumexp(kept, -1)
      logprob = _gather(kept, token) - norm
    learner = _gather(scaled, token) - learner_norm
    return token.astype(jnp.int32), logprob, learner


def token_sampler(temperature: float, top_k: int = 0, top_p: float = 1.0) -> TokenSampler:
  """The sampler for generate's settings: temperature 0 is greedy (top_k and top_p unused)."""
  if temperature == 0:
    return Greedy()
  return Sampled(float(temperature), int(top_k), float(top_p))


def sample_logits(logits_BV, u_B, temperature: float, top_k: int, top_p: float):
  """One token per row. Returns (token_B, logprob_B under the truncated distribution,
  learner_logprob_B = untruncated log_softmax(logits / T) at the token)."""
  return token_sampler(temperature, top_k, top_p).get_next_tokens(logits_BV, u_B)


# --------------------------------------------------------------------------------------------
# Kernels: inverse CDF, top-k tournament, bisection over float bit patterns
# --------------------------------------------------------------------------------------------


def _inverse_cdf(weights_BV, u_B):
  """Index drawn with probability weights / sum (weights >= 0), from one uniform per row.

  Two levels so each cumsum is short: a block of `_BLOCK` entries by its total, then an entry.
  """
  B, V = weights_BV.shape
  nb = -(-V // _BLOCK)
  w = jnp.pad(weights_BV, ((0, 0), (0, nb * _BLOCK - V))).reshape(B, nb, _BLOCK)
  block_mass = w.sum(-1)
  block_cum = jnp.cumsum(block_mass, -1)
  target = u_B * block_cum[:, -1]
  block = jnp.minimum(jnp.sum(block_cum <= target[:, None], -1), nb - 1)
  inside = jnp.take_along_axis(w, block[:, None, None], 1)[:, 0]
  rest = target - jnp.take_along_axis(block_cum - block_mass, block[:, None], 1)[:, 0]
  inner_cum = jnp.cumsum(inside, -1)
  j = jnp.sum(inner_cum <= rest[:, None], -1)
  # Rounding can push the target past the last positive weight: fall back to the block's last one.
  last_positive = _BLOCK - 1 - jnp.argmax((inside > 0)[:, ::-1], -1)
  return block * _BLOCK + jnp.minimum(j, last_positive)


def _top_k_tournament(x_BV, k):
  """Exact top-k (values descending, indices; ties to the lower index) without a sort: keep each
  block's best remaining value; k times take the best block's best, then that block's next."""
  B, V = x_BV.shape
  nb = -(-V // _BLOCK)
  xb = jnp.pad(x_BV, ((0, 0), (0, nb * _BLOCK - V)), constant_values=-jnp.inf)
  xb = xb.reshape(B, nb, _BLOCK)
  rows, iota = jnp.arange(B), jnp.arange(_BLOCK)[None]

  def take_next(i, carry):
    block_best, last_v, last_j, vals, idxs = carry
    b = jnp.argmax(block_best, -1)
    v = block_best[rows, b]
    blk = xb[rows, b]
    # Entries of the block not taken yet: after (value, index) of the last one taken, in order.
    prev_v, prev_j = last_v[rows, b][:, None], last_j[rows, b][:, None]
    remaining = (blk < prev_v) | ((blk == prev_v) & (iota > prev_j))
    j = jnp.argmax(remaining & (blk == v[:, None]), -1)
    vals, idxs = vals.at[:, i].set(v), idxs.at[:, i].set(b * _BLOCK + j)
    later = (blk < v[:, None]) | ((blk == v[:, None]) & (iota > j[:, None]))
    block_best = block_best.at[rows, b].set(jnp.where(later, blk, -jnp.inf).max(-1))
    return (block_best, last_v.at[rows, b].set(v), last_j.at[rows, b].set(j), vals, idxs)

  carry = (xb.max(-1), jnp.full((B, nb), jnp.inf, x_BV.dtype), jnp.full((B, nb), -1, jnp.int32),
           jnp.zeros((B, k), x_BV.dtype), jnp.zeros((B, k), jnp.int32))
  *_, vals, idxs = jax.lax.fori_loop(0, k, take_next, carry)
  return vals, idxs


def _ordered_key(x):
  """uint32 whose order is the float order (bisection over bit patterns is exact in 32 steps)."""
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where((u >> 31) == 1, ~u, u | jnp.uint32(0x80000000))


def _largest_key_where(key_BV, holds):
  """Per row, the largest t with holds(key >= t) (holds is monotone and holds at the minimum)."""
  lo, hi = key_BV.min(-1), key_BV.max(-1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo + 1) // 2
    ok = holds(key_BV >= mid[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return lo


def _keep_top_p(x_BV, top_p):
  """Mask of the smallest highest-first set whose mass reaches top_p (HF's rule: a token stays if
  the mass strictly above it is < top_p). -inf entries never stay."""
  key = _ordered_key(x_BV)
  p = jnp.exp(x_BV - x_BV.max(-1, keepdims=True))
  need = top_p * p.sum(-1)
  threshold = _largest_key_where(key, lambda m: jnp.where(m, p, 0).sum(-1) >= need)
  return (key >= threshold[:, None]) & (p > 0)


def _gather(x_BV, idx_B):
  return jnp.take_along_axis(x_BV, idx_B[:, None], -1)[:, 0]
