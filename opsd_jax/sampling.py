"""KV-cached sampler: bucketed prefill, group tiling, one jitted `lax.while_loop` decode.

How a call runs (`generate`):
  1. Prompts are left-padded to the smallest configured bucket that holds the longest one, so the
     number of distinct shapes (and compiles) stays bounded (gemma's approach).
  2. Each *distinct* prompt is prefilled once into a prompt cache (per layer, U rows of P slots);
     the logits of its last position give the first token's distribution. The `num_samples` rows
     of a prompt (GRPO group) copy that cache instead of recomputing it (big_vision's "prefill
     once, repeat n").
  3. Decode runs in slots. A slot holds one (prompt, sample) row: its cache row is
     [prompt | generated tokens], written at a per-row position. Each step samples one token per
     active slot, writes it to the outputs, then feeds it through the model (`forward_cached` with
     T = 1). A slot stops on an EOS id or after `max_new_tokens`; the loop ends when every row is
     done. Static batching is the case slots = rows. Continuous batching uses fewer slots: when a
     row finishes, its slot takes the next pending row (copying that prompt's prefilled cache into
     the slot) instead of idling until the batch's longest row ends.

The whole loop lives inside one jit: the cache is created there and carried by the while loop, so
XLA updates it in place (the donation a caller-owned cache would need is implicit). What keeps a
decode step near the cost of its weight matmuls on CPU:
  - layers are unrolled over one KV buffer per layer and weights unstacked once before the loop
    (a scanned, stacked cache costs a copy of each layer's K and V slice, and of its weights, per
    step);
  - a static batch grows its cache in phases (`_phase_ends`), so attention reads about
    prompt + t slots, not prompt + max_new_tokens;
  - the uniforms are drawn for every (row, token) before the loop: no RNG in the step;
  - a step's attention reads each layer's cache as it was plus the new token, and only then writes
    the new slot (`model._attend_cache_and_new`), so XLA updates the buffer in place instead of
    copying it twice per layer.

Sampling never calls `jax.random.categorical` (Gumbel noise over the whole vocabulary costs more
than the rest of a small model's decode step on CPU): one uniform per row and an inverse CDF,
done in two levels (pick a block of the vocabulary by its mass, then a token inside it). Top-k
(k <= 64) extracts the k best exactly with a per-block maximum tournament, never sorting the
vocabulary (XLA's CPU sort / `lax.top_k` cost ~100 ms on 32 x 8192); larger k and top-p without
top-k find their threshold by bisection on the float bit pattern.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from opsd_jax import model, parallel
from opsd_jax.config import ModelConfig

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_TOURNAMENT_MAX_K = 64   # above this, top-k by bisection (the tournament is k sequential steps)
_BLOCK = 128             # vocabulary block for the two-level inverse CDF and the tournament
_MAX_PHASES = 8          # static batching: the cache grows in at most this many steps ...
_MIN_PHASE = 32          # ... of a multiple of this many slots
_REFILL_FRACTION = 4     # continuous batching refills at most 1/4 of the slots per step


@dataclasses.dataclass
class SampleOutput:
  """Rows are prompt-major: prompt i's samples are rows i * num_samples ... (i + 1) * num_samples - 1.

  tokens [N, T_new] int32, 0 after a row stops (the EOS token itself is kept and counted);
  logprobs [N, T_new]: log-prob of each token under the distribution sampled from (after
  temperature, top-k, top-p; 0 for greedy); lengths [N]; finished [N] (stopped on EOS);
  learner_logprobs [N, T_new] or None: untruncated log_softmax(logits / T) at the token (T = 1 for
  greedy); num_prefills: prompt prefills that ran (one per distinct prompt).
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  finished: np.ndarray
  learner_logprobs: np.ndarray | None
  num_prefills: int


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int] = DEFAULT_BUCKETS,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to the smallest bucket >= the longest prompt: (ids [N, P] int32, mask
  [N, P] bool, True on real tokens). Errors on an empty prompt or one longer than every bucket."""
  if len(prompts) == 0:
    raise ValueError("prompts: got an empty list")
  if not buckets or any(int(b) < 1 for b in buckets):
    raise ValueError(f"prompt_buckets must be positive lengths, got {tuple(buckets)}")
  lengths = [len(p) for p in prompts]
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompts[{i}] is empty")
  longest = max(lengths)
  fitting = sorted(int(b) for b in buckets if int(b) >= longest)
  if not fitting:
    row = lengths.index(longest)
    raise ValueError(f"prompts[{row}] has {longest} tokens, longer than the largest prompt bucket "
                     f"{max(buckets)}")
  width = fitting[0]
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = np.asarray(p, np.int32)
    mask[i, width - len(p):] = True
  return ids, mask


# --------------------------------------------------------------------------------------------
# Sampling one token per row
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


def sample_logits(logits_BV, u_B, temperature: float, top_k: int, top_p: float):
  """One token per row. Returns (token_B, logprob_B under the truncated distribution,
  learner_logprob_B = untruncated log_softmax(logits / T) at the token)."""
  logits_BV = logits_BV.astype(jnp.float32)
  B, V = logits_BV.shape
  if temperature == 0:
    token = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    learner = _gather(logits_BV, token) - jax.nn.logsumexp(logits_BV, -1)
    return token, jnp.zeros((B,), jnp.float32), learner
  scaled = logits_BV / temperature
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


def _gather(x_BV, idx_B):
  return jnp.take_along_axis(x_BV, idx_B[:, None], -1)[:, 0]


# --------------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class _LoopState:
  step: jax.Array          # iterations run (static batching: = every active row's t)
  next_row: jax.Array      # first row not yet given a slot
  slot_row: jax.Array      # [B] row each slot decodes (num_rows = none)
  slot_t: jax.Array        # [B] tokens that row has generated
  slot_done: jax.Array     # [B]
  slot_plen: jax.Array     # [B] real prompt length of the row (positions)
  logits: jax.Array        # [B, V] next-token logits
  cache: dict              # k, v: L buffers each, model.CACHE_LAYOUT (S grows by phase)
  kv_mask: jax.Array       # [B, S]
  slot_out: tuple          # tokens, logprobs, learner [B, T_new + 1] of each slot's current row
  slot_finished: jax.Array  # [B] the slot's row stopped on EOS
  out: tuple               # tokens, logprobs, learner [N, T_new], lengths [N], finished [N]


def _write_columns(buf_BT, value_B, column_B):
  """buf[b, column[b]] = value[b]: vmapped dynamic_update_slice, a scatter with a batch dim that
  stays local to each device's rows on a data-sharded mesh."""
  return jax.vmap(lambda row, v, c: jax.lax.dynamic_update_slice(row, v[None], (c,)))(
      buf_BT, value_B.astype(buf_BT.dtype), column_B)


def _phase_ends(max_new_tokens: int, grow_cache: bool) -> list[int]:
  """Decode steps at which the cache grows. Attention reads every slot of the cache it is given,
  so a static batch (all rows at the same step) decodes in up to `_MAX_PHASES` phases whose cache
  holds only the prompt + the steps so far, rounded up to a chunk: the attended length averages
  about prompt + t instead of prompt + max_new_tokens. Continuous batching mixes rows at every
  step, so it keeps one phase with the full length."""
  if not grow_cache:
    return [max_new_tokens]
  chunk = max(_MIN_PHASE, _round_up(-(-max_new_tokens // _MAX_PHASES), _MIN_PHASE))
  return list(range(chunk, max_new_tokens, chunk)) + [max_new_tokens]


@functools.partial(jax.jit, static_argnames=(
    "cfg", "num_rows", "num_samples", "num_slots", "max_new_tokens", "temperature", "top_k",
    "top_p", "eos_ids", "grow_cache", "cache_sharding", "batch_sharding"))
def _generate_jit(params, ids_UP, mask_UP, prompt_of_row_N, rng, *, cfg, num_rows, num_samples,
                  num_slots, max_new_tokens, temperature, top_k, top_p, eos_ids, grow_cache,
                  cache_sharding, batch_sharding):
  del num_samples  # rows map to prompts through prompt_of_row_N
  U, Pw = ids_UP.shape
  N, B, T_new = num_rows, num_slots, max_new_tokens
  constrain_cache = ((lambda c: jax.lax.with_sharding_constraint(c, cache_sharding))
                     if cache_sharding is not None else (lambda c: c))
  constrain_batch = ((lambda x: jax.lax.with_sharding_constraint(x, batch_sharding))
                     if batch_sharding is not None else (lambda x: x))
  # Per-layer weights and cache buffers: sliced once here, updated in place in the loop.
  params = model.unstack_layers(params)

  # Prefill every distinct prompt once.
  plen_U = mask_UP.sum(-1).astype(jnp.int32)
  prompt_logits, prompt_cache = model.forward_cached(
      cfg, params, ids_UP, model.positions_from_mask(mask_UP),
      model.init_cache(cfg, U, Pw, per_layer=True), jnp.zeros((U,), jnp.int32), mask_UP,
      last_only=True)
  prompt_logits = prompt_logits[:, 0]

  def refill(state: _LoopState, width: int) -> _LoopState:
    """Up to `width` free slots take the next pending rows: the prompt's cache, mask and first
    logits. The copy costs width x prompt, not slots x prompt: a decode step refills a few slots
    (rows end a few at a time); any left free wait a step."""
    slot_W = jnp.nonzero(state.slot_done, size=width, fill_value=B)[0]
    row_W = state.next_row + jnp.arange(width)
    take_W = (slot_W < B) & (row_W < N)  # a prefix: free slots and pending rows both come first
    slot_W = jnp.where(take_W, slot_W, B)  # B = out of range: every scatter below drops it
    u_W = prompt_of_row_N[jnp.minimum(row_W, N - 1)]
    if B < N:  # continuous: the rows these slots held so far go to the outputs first
      state = flush(state, slot_W)
    put = lambda x, value: x.at[slot_W].set(value, mode="drop")  # noqa: E731
    cache = {name: tuple(buf.at[model.along_cache_slots(name, slice(Pw), slot_W, slice(None))]
                         .set(prompt_buf[u_W], mode="drop")
                         for buf, prompt_buf in zip(bufs, prompt_cache[name]))
             for name, bufs in state.cache.items()}
    S = state.kv_mask.shape[1]
    kv_rows = jnp.concatenate([mask_UP[u_W], jnp.ones((width, S - Pw), bool)], -1)
    return state.replace(
        next_row=state.next_row + take_W.sum(),
        slot_row=put(state.slot_row, row_W), slot_t=put(state.slot_t, 0),
        slot_done=put(state.slot_done, False), slot_plen=put(state.slot_plen, plen_U[u_W]),
        logits=put(state.logits, prompt_logits[u_W]), cache=constrain_cache(cache),
        kv_mask=put(state.kv_mask, kv_rows),
        slot_out=tuple(put(buf, 0) for buf in state.slot_out),
        slot_finished=put(state.slot_finished, False))

  def flush(state: _LoopState, slot_W) -> _LoopState:
    """Copies the rows that slots slot_W hold (B = no slot) into the outputs (continuous
    batching: a slot's row is copied once, when the slot is refilled or the loop ends)."""
    s_W = jnp.minimum(slot_W, B - 1)
    row_W = jnp.where(slot_W < B, state.slot_row[s_W], N)  # N (no row): dropped
    put = lambda out, value: out.at[row_W].set(value, mode="drop")  # noqa: E731
    tokens, logprobs, learner, lengths, finished = state.out
    new = [put(o, buf[s_W, :T_new]) for o, buf in zip((tokens, logprobs, learner), state.slot_out)]
    return state.replace(out=(*new, put(lengths, state.slot_t[s_W]),
                              put(finished, state.slot_finished[s_W])))

  def body(state: _LoopState) -> _LoopState:
    if B < N:  # continuous batching; a static batch is filled once, before the loop
      state = jax.lax.cond(jnp.any(state.slot_done) & (state.next_row < N),
                           functools.partial(refill, width=refill_width), lambda s: s, state)
    u_B = uniform_NT[jnp.minimum(state.slot_row, N - 1), jnp.minimum(state.slot_t, T_new - 1)]
    token, logprob, learner = sample_logits(state.logits, u_B, temperature, top_k, top_p)
    active = ~state.slot_done
    t = state.slot_t
    column = jnp.where(active, t, T_new)  # done slots write their spare last column
    hit_eos = jnp.zeros_like(active)
    for eos in eos_ids:
      hit_eos = hit_eos | (token == eos)
    finished = active & hit_eos
    new_t = t + active
    done = state.slot_done | finished | (new_t >= T_new)
    # Feed the token: slot Pw + t of the row's cache, position plen + t. (A done row's slot is
    # clipped into the current cache; what it writes there is never read.)
    S = state.kv_mask.shape[1]
    logits, cache = model.forward_cached(
        cfg, params, token[:, None], (state.slot_plen + t)[:, None], state.cache,
        Pw + jnp.minimum(t, S - Pw - 1), state.kv_mask)
    return state.replace(
        step=state.step + 1, slot_t=new_t, slot_done=done,
        logits=constrain_batch(logits[:, 0]), cache=constrain_cache(cache),
        slot_out=tuple(_write_columns(buf, value, column)
                       for buf, value in zip(state.slot_out, (token, logprob, learner))),
        slot_finished=state.slot_finished | finished)

  def not_done(state: _LoopState):
    return ~(jnp.all(state.slot_done) & (state.next_row >= N))

  # One uniform per (row, token), drawn before the loop: no RNG work in the decode step, and a
  # row's samples depend on the key alone, not on the slot or step it ran in.
  uniform_NT = jax.random.uniform(rng, (N, T_new))
  refill_width = max(1, -(-B // _REFILL_FRACTION))
  ends = _phase_ends(T_new, grow_cache)
  V = prompt_logits.shape[-1]
  state = _LoopState(
      step=jnp.int32(0), next_row=jnp.int32(0), slot_row=jnp.full((B,), N, jnp.int32),
      slot_t=jnp.zeros((B,), jnp.int32), slot_done=jnp.ones((B,), bool),
      slot_plen=jnp.zeros((B,), jnp.int32), logits=jnp.zeros((B, V), jnp.float32),
      cache=constrain_cache(model.init_cache(cfg, B, Pw + ends[0], per_layer=True)),
      kv_mask=jnp.zeros((B, Pw + ends[0]), bool),
      slot_out=(jnp.zeros((B, T_new + 1), jnp.int32), jnp.zeros((B, T_new + 1), jnp.float32),
                jnp.zeros((B, T_new + 1), jnp.float32)),
      slot_finished=jnp.zeros((B,), bool),
      # static batching needs no row outputs: slot b holds row b throughout
      out=() if B >= N else (jnp.zeros((N, T_new), jnp.int32),
                             jnp.zeros((N, T_new), jnp.float32),
                             jnp.zeros((N, T_new), jnp.float32), jnp.zeros((N,), jnp.int32),
                             jnp.zeros((N,), bool)))
  state = refill(state, width=B)
  for phase, end in enumerate(ends):
    if phase:  # a longer cache: the new slots are empty and, being after every query, unread
      grow = end - ends[phase - 1]
      state = state.replace(
          cache=constrain_cache({
              name: tuple(jnp.pad(buf, model.along_cache_slots(name, (0, grow), (0, 0), (0, 0)))
                          for buf in bufs)
              for name, bufs in state.cache.items()}),
          kv_mask=jnp.pad(state.kv_mask, ((0, 0), (0, grow)), constant_values=True))
    # The last phase has no step bound: continuous batching runs until every row is done.
    last = phase == len(ends) - 1
    state = jax.lax.while_loop(lambda s, end=end, last=last: not_done(s) & (last | (s.step < end)),
                               body, state)
  if B >= N:  # static: slot b is row b (slots past N, padding for the mesh, never ran)
    return (*(buf[:N, :T_new] for buf in state.slot_out), state.slot_t[:N],
            state.slot_finished[:N])
  return flush(state, jnp.arange(B)).out


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _check_args(cfg, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, eos_ids,
                num_slots):
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if num_slots is not None and num_slots < 1:
    raise ValueError(f"num_slots must be >= 1, got {num_slots}")
  for i, p in enumerate(prompts):
    bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
  for e in eos_ids:
    if not 0 <= int(e) < cfg.vocab_size:
      raise ValueError(f"eos id {e} outside the vocabulary [0, {cfg.vocab_size})")


def _round_up(n, m):
  return -(-n // m) * m


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, rng: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, eos_ids: Sequence[int] = (),
             prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
             return_learner_logprobs: bool = False, continuous_batching: bool = False,
             num_slots: int | None = None, mesh: jax.sharding.Mesh | None = None) -> SampleOutput:
  """Samples `num_samples` completions of each prompt (lists of token ids). See `SampleOutput`.

  temperature 0 = greedy; top_k = 0 and top_p = 1 switch truncation off; eos_ids = () never stops
  early. continuous_batching decodes `num_slots` rows at a time (default min(rows, 32)), refilling
  a slot as soon as its row ends; static batching decodes all rows at once. With a mesh, slots are
  split over ("data", "fsdp") and KV heads over "tensor"; the key alone fixes the samples.
  """
  prompts = [list(p) for p in prompts]
  _check_args(cfg, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, eos_ids,
              num_slots)
  ids_NP, mask_NP = pad_prompts(prompts, prompt_buckets)
  if ids_NP.shape[1] + max_new_tokens > cfg.max_position:
    raise ValueError(f"prompt bucket {ids_NP.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"the model's max_position {cfg.max_position}")

  # Distinct prompts, each prefilled once; rows point at them.
  distinct: dict[tuple[int, ...], int] = {}
  prompt_index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
  first_of = {u: i for i, u in reversed(list(enumerate(prompt_index)))}
  order = [first_of[u] for u in range(len(distinct))]
  num_rows = len(prompts) * num_samples
  prompt_of_row = np.repeat(np.asarray(prompt_index, np.int32), num_samples)

  dp = parallel.data_parallel_size(mesh) if mesh is not None else 1
  if continuous_batching:
    slots = min(num_rows, 32) if num_slots is None else num_slots
  else:
    slots = num_rows
  slots = _round_up(slots, dp)
  U = _round_up(len(distinct), dp)
  ids_UP = np.zeros((U, ids_NP.shape[1]), np.int32)
  mask_UP = np.zeros((U, ids_NP.shape[1]), bool)
  ids_UP[:len(order)], mask_UP[:len(order)] = ids_NP[order], mask_NP[order]
  mask_UP[len(order):, -1] = True  # padding prompts: one pad token, never used

  cache_sharding = batch_sharding = None
  if mesh is not None:
    tensor = "tensor" if cfg.n_kv_heads % mesh.shape["tensor"] == 0 else None
    cache_sharding = NamedSharding(mesh, P(parallel.BATCH, tensor, None, None))
    batch_sharding = parallel.batch_sharding(mesh, 2)
    params = jax.device_put(params, parallel.param_shardings(cfg, mesh))
    # every process holds all prompts (multi-host: each feeds its rows of the global arrays)
    ids_UP, mask_UP = parallel.shard_global_batch((ids_UP, mask_UP), mesh)
  tokens, logprobs, learner, lengths, finished = _generate_jit(
      params, ids_UP, mask_UP, prompt_of_row, rng, cfg=cfg, num_rows=num_rows,
      num_samples=num_samples, num_slots=slots, max_new_tokens=int(max_new_tokens),
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
      eos_ids=tuple(int(e) for e in eos_ids), grow_cache=not continuous_batching,
      cache_sharding=cache_sharding,
      batch_sharding=batch_sharding)
  # whole arrays on every process (multi-host: gathered from the other processes' devices)
  tokens, logprobs, lengths, finished = parallel.to_host((tokens, logprobs, lengths, finished))
  return SampleOutput(
      tokens=tokens, logprobs=logprobs, lengths=lengths, finished=finished,
      learner_logprobs=parallel.to_host(learner) if return_learner_logprobs else None,
      num_prefills=len(distinct))
