"""The decode loop, as named pieces over one state (organised as gemma's `_sampler_loop.py`).

`SamplerLoop.sample` runs inside one jit:
  `prefill`  each distinct prompt once into a prompt cache; its last logits give the first token's
             distribution. The `num_samples` rows of a prompt (a GRPO group) copy that cache
             instead of recomputing it (big_vision's "prefill once, repeat n").
  `refill`   free slots take the next pending rows: the prompt's cache, mask and first logits.
             All slots at the start; with continuous batching (fewer slots than rows) also inside
             the loop, as soon as a row ends.
  `step`     samples one token per active slot, writes it to the slot's outputs and feeds it
             through the model (`model.forward_cached` with T = 1).
  `flush`    copies the rows that slots hold into the row outputs (continuous batching only: a
             static batch's slot b is row b throughout).
  `grow`     a static batch's cache gets longer between phases (`phase_ends`), so attention reads
             about prompt + t slots, not prompt + max_new_tokens.

The cache is created inside the jit and carried by the while loop, so XLA updates it in place
(the donation a caller-owned cache would need is implicit). What keeps a decode step near the cost
of its weight matmuls on CPU (bench: `python bench/sampler.py --only ours,floor`):
  - layers are unrolled over one KV buffer per layer and weights unstacked once before the loop
    (a scanned, stacked cache costs a copy of each layer's K and V slice, and of its weights, per
    step);
  - the static batch's cache grows in phases (above);
  - the uniforms are drawn for every (row, token) before the loop: no RNG in the step;
  - a step's attention reads each layer's cache as it was plus the new token, and only then writes
    the new slot (`kv_cache.attend_and_write`), so XLA updates the buffer in place instead of
    copying it twice per layer.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from opsd_jax import kv_cache, model
from opsd_jax.config import ModelConfig
from opsd_jax.token_sampling import TokenSampler

_MAX_PHASES = 8          # static batching: the cache grows in at most this many steps ...
_MIN_PHASE = 32          # ... of a multiple of this many slots
_REFILL_FRACTION = 4     # continuous batching refills at most 1/4 of the slots per step


@flax.struct.dataclass
class SamplingState:
  """What the decode loop carries. A slot is one decoding row of the batch; a row is one
  (prompt, sample) pair, N of them. With static batching slot b decodes row b throughout.

  Attributes:
    step: iterations run (static batching: every active row's t).
    next_row: first row not yet given a slot.
    slot_row: [B] row each slot decodes (N = none).
    slot_t: [B] tokens that row has generated.
    slot_done: [B] the slot's row has stopped (or the slot holds none).
    slot_plen: [B] real prompt length of the row (its positions continue from it).
    logits: [B, V] next-token logits.
    cache: k, v: L buffers each, kv_cache.CACHE_LAYOUT [B, ..., S] (S grows by phase).
    kv_mask: [B, S] valid cache slots (prompt padding is not).
    slot_out: tokens, logprobs, learner logprobs [B, T_new + 1] of each slot's current row (the
      spare last column takes the writes of done slots).
    slot_finished: [B] the slot's row stopped on EOS.
    out: continuous batching's row outputs: tokens, logprobs, learner [N, T_new], lengths [N],
      finished [N]; () for a static batch.
  """
  step: jax.Array
  next_row: jax.Array
  slot_row: jax.Array
  slot_t: jax.Array
  slot_done: jax.Array
  slot_plen: jax.Array
  logits: jax.Array
  cache: dict
  kv_mask: jax.Array
  slot_out: tuple
  slot_finished: jax.Array
  out: tuple


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The distinct prompts, prefilled once; read-only in the loop. U prompts of Pw slots."""
  mask_UP: jax.Array        # real tokens of the left-padded prompts
  plen_U: jax.Array         # real prompt lengths
  logits_UV: jax.Array      # next-token logits after each prompt
  cache: dict               # k, v: L buffers each [U, ..., Pw] (kv_cache.CACHE_LAYOUT)
  row_prompt_N: jax.Array   # the prompt each row samples from


def _round_up(n, m):
  return -(-n // m) * m


def phase_ends(max_new_tokens: int, grow_cache: bool) -> list[int]:
  """Decode steps at which the cache grows. Attention reads every slot of the cache it is given,
  so a static batch (all rows at the same step) decodes in up to `_MAX_PHASES` phases whose cache
  holds only the prompt + the steps so far, rounded up to a chunk: the attended length averages
  about prompt + t instead of prompt + max_new_tokens. Continuous batching mixes rows at every
  step, so it keeps one phase with the full length."""
  if not grow_cache:
    return [max_new_tokens]
  chunk = max(_MIN_PHASE, _round_up(-(-max_new_tokens // _MAX_PHASES), _MIN_PHASE))
  return list(range(chunk, max_new_tokens, chunk)) + [max_new_tokens]


def _write_columns(buf_BT, value_B, column_B):
  """buf[b, column[b]] = value[b]: vmapped dynamic_update_slice, a scatter with a batch dim that
  stays local to each device's rows on a data-sharded mesh."""
  return jax.vmap(lambda row, v, c: jax.lax.dynamic_update_slice(row, v[None], (c,)))(
      buf_BT, value_B.astype(buf_BT.dtype), column_B)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerLoop:
  """One sampling configuration. Only static, hashable attributes, so it is jit's static
  argument: calls with equal settings share a compile.

  Attributes:
    cfg: the model.
    num_rows: N = prompts x samples.
    num_slots: B, rows decoded at once (B >= N: static batching; B < N: continuous).
    max_new_tokens: T_new.
    method: how a token is drawn from the logits (opsd_jax/token_sampling.py).
    eos_ids: a row stops after generating one of these.
    grow_cache: static batching's phased cache (`phase_ends`).
    cache_sharding, batch_sharding: where the cache and the [B, V] logits live on a mesh, or None.
  """
  cfg: ModelConfig
  num_rows: int
  num_slots: int
  max_new_tokens: int
  method: TokenSampler
  eos_ids: tuple[int, ...]
  grow_cache: bool
  cache_sharding: jax.sharding.Sharding | None = None
  batch_sharding: jax.sharding.Sharding | None = None

  @functools.partial(jax.jit, static_argnames=("self",))
  def sample(self, params, ids_UP, mask_UP, row_prompt_N, rng):
    """Samples every row. Returns (tokens, logprobs, learner logprobs [N, T_new], lengths [N],
    finished [N])."""
    N, B, T_new = self.num_rows, self.num_slots, self.max_new_tokens
    # Per-layer weights and cache buffers: sliced once here, updated in place in the loop.
    params = model.unstack_layers(params)
    prompts = self.prefill(params, ids_UP, mask_UP, row_prompt_N)
    # One uniform per (row, token), drawn before the loop: no RNG work in the decode step, and a
    # row's samples depend on the key alone, not on the slot or step it ran in.
    uniform_NT = jax.random.uniform(rng, (N, T_new))
    refill_width = max(1, -(-B // _REFILL_FRACTION))
    ends = phase_ends(T_new, self.grow_cache)
    state = self.refill(self.init_state(prompts, ends[0]), prompts, width=B)

    def body(state: SamplingState) -> SamplingState:
      if B < N:  # continuous batching; a static batch is filled once, before the loop
        state = jax.lax.cond(jnp.any(state.slot_done) & (state.next_row < N),
                             functools.partial(self.refill, prompts=prompts, width=refill_width),
                             lambda s: s, state)
      return self.step(state, params, prompts, uniform_NT)

    for phase, end in enumerate(ends):
      if phase:
        state = self.grow(state, end - ends[phase - 1])
      # Run while any row is unfinished (a slot still decoding, or a row not yet given a slot)
      # and, in every phase but the last, until the phase's step bound; the last phase has none:
      # continuous batching runs until every row is done.
      last = phase == len(ends) - 1
      state = jax.lax.while_loop(
          lambda s, end=end, last=last: self.is_running(s) & (last | (s.step < end)), body, state)
    if B >= N:  # static: slot b is row b (slots past N, padding for the mesh, never ran)
      return (*(buf[:N, :T_new] for buf in state.slot_out), state.slot_t[:N],
              state.slot_finished[:N])
    return self.flush(state, jnp.arange(B)).out

  def prefill(self, params, ids_UP, mask_UP, row_prompt_N) -> Prompts:
    """Every distinct prompt through the model once, into its own cache of Pw slots."""
    cfg = self.cfg
    U, Pw = ids_UP.shape
    plen_U = mask_UP.sum(-1).astype(jnp.int32)
    logits, cache = model.forward_cached(
        cfg, params, ids_UP, model.positions_from_mask(mask_UP),
        kv_cache.init_cache(cfg, U, Pw, per_layer=True), jnp.zeros((U,), jnp.int32), mask_UP,
        last_only=True)
    return Prompts(mask_UP=mask_UP, plen_U=plen_U, logits_UV=logits[:, 0], cache=cache,
                   row_prompt_N=row_prompt_N)

  def init_state(self, prompts: Prompts, first_phase: int) -> SamplingState:
    """Every slot free (done, holding no row), the cache empty at prompt + first_phase slots."""
    N, B, T_new = self.num_rows, self.num_slots, self.max_new_tokens
    S = prompts.mask_UP.shape[1] + first_phase
    V = prompts.logits_UV.shape[-1]
    return SamplingState(
        step=jnp.int32(0), next_row=jnp.int32(0), slot_row=jnp.full((B,), N, jnp.int32),
        slot_t=jnp.zeros((B,), jnp.int32), slot_done=jnp.ones((B,), bool),
        slot_plen=jnp.zeros((B,), jnp.int32), logits=jnp.zeros((B, V), jnp.float32),
        cache=self._constrain_cache(kv_cache.init_cache(self.cfg, B, S, per_layer=True)),
        kv_mask=jnp.zeros((B, S), bool),
        slot_out=(jnp.zeros((B, T_new + 1), jnp.int32), jnp.zeros((B, T_new + 1), jnp.float32),
                  jnp.zeros((B, T_new + 1), jnp.float32)),
        slot_finished=jnp.zeros((B,), bool),
        # static batching needs no row outputs: slot b holds row b throughout
        out=() if B >= N else (jnp.zeros((N, T_new), jnp.int32),
                               jnp.zeros((N, T_new), jnp.float32),
                               jnp.zeros((N, T_new), jnp.float32), jnp.zeros((N,), jnp.int32),
                               jnp.zeros((N,), bool)))

  def refill(self, state: SamplingState, prompts: Prompts, width: int) -> SamplingState:
    """Up to `width` free slots take the next pending rows: the prompt's cache, mask and first
    logits. The copy costs width x prompt, not slots x prompt: a decode step refills a few slots
    (rows end a few at a time); any left free wait a step."""
    N, B = self.num_rows, self.num_slots
    Pw = prompts.mask_UP.shape[1]
    slot_W = jnp.nonzero(state.slot_done, size=width, fill_value=B)[0]
    row_W = state.next_row + jnp.arange(width)
    take_W = (slot_W < B) & (row_W < N)  # a prefix: free slots and pending rows both come first
    slot_W = jnp.where(take_W, slot_W, B)  # B = out of range: every scatter below drops it
    u_W = prompts.row_prompt_N[jnp.minimum(row_W, N - 1)]
    if B < N:  # continuous: the rows these slots held so far go to the outputs first
      state = self.flush(state, slot_W)
    put = lambda x, value: x.at[slot_W].set(value, mode="drop")  # noqa: E731
    cache = {name: tuple(buf.at[kv_cache.along_cache_slots(name, slice(Pw), slot_W, slice(None))]
                         .set(prompt_buf[u_W], mode="drop")
                         for buf, prompt_buf in zip(bufs, prompts.cache[name]))
             for name, bufs in state.cache.items()}
    S = state.kv_mask.shape[1]
    kv_rows = jnp.concatenate([prompts.mask_UP[u_W], jnp.ones((width, S - Pw), bool)], -1)
    return state.replace(
        next_row=state.next_row + take_W.sum(),
        slot_row=put(state.slot_row, row_W), slot_t=put(state.slot_t, 0),
        slot_done=put(state.slot_done, False), slot_plen=put(state.slot_plen, prompts.plen_U[u_W]),
        logits=put(state.logits, prompts.logits_UV[u_W]), cache=self._constrain_cache(cache),
        kv_mask=put(state.kv_mask, kv_rows),
        slot_out=tuple(put(buf, 0) for buf in state.slot_out),
        slot_finished=put(state.slot_finished, False))

  def flush(self, state: SamplingState, slot_W) -> SamplingState:
    """Copies the rows that slots slot_W hold (B = no slot) into the outputs (continuous
    batching: a slot's row is copied once, when the slot is refilled or the loop ends)."""
    N, B, T_new = self.num_rows, self.num_slots, self.max_new_tokens
    s_W = jnp.minimum(slot_W, B - 1)
    row_W = jnp.where(slot_W < B, state.slot_row[s_W], N)  # N (no row): dropped
    put = lambda out, value: out.at[row_W].set(value, mode="drop")  # noqa: E731
    tokens, logprobs, learner, lengths, finished = state.out
    new = [put(o, buf[s_W, :T_new]) for o, buf in zip((tokens, logprobs, learner), state.slot_out)]
    return state.replace(out=(*new, put(lengths, state.slot_t[s_W]),
                              put(finished, state.slot_finished[s_W])))

  def step(self, state: SamplingState, params, prompts: Prompts, uniform_NT) -> SamplingState:
    """One token for every active slot, written to its outputs and fed through the model."""
    N, T_new = self.num_rows, self.max_new_tokens
    Pw = prompts.mask_UP.shape[1]
    u_B = uniform_NT[jnp.minimum(state.slot_row, N - 1), jnp.minimum(state.slot_t, T_new - 1)]
    token, logprob, learner = self.method.get_next_tokens(state.logits, u_B)
    active = ~state.slot_done
    t = state.slot_t
    column = jnp.where(active, t, T_new)  # done slots write their spare last column
    hit_eos = jnp.zeros_like(active)
    for eos in self.eos_ids:
      hit_eos = hit_eos | (token == eos)
    # A slot stops on an EOS token (kept and counted in its length) ...
    finished = active & hit_eos
    new_t = t + active
    # ... or once it has generated max_new_tokens.
    done = state.slot_done | finished | (new_t >= T_new)
    # Feed the token: slot Pw + t of the row's cache, position plen + t. (A done row's slot is
    # clipped into the current cache; what it writes there is never read.)
    S = state.kv_mask.shape[1]
    logits, cache = model.forward_cached(
        self.cfg, params, token[:, None], (state.slot_plen + t)[:, None], state.cache,
        Pw + jnp.minimum(t, S - Pw - 1), state.kv_mask)
    return state.replace(
        step=state.step + 1, slot_t=new_t, slot_done=done,
        logits=self._constrain_batch(logits[:, 0]), cache=self._constrain_cache(cache),
        slot_out=tuple(_write_columns(buf, value, column)
                       for buf, value in zip(state.slot_out, (token, logprob, learner))),
        slot_finished=state.slot_finished | finished)

  def grow(self, state: SamplingState, extra_slots: int) -> SamplingState:
    """A longer cache for the next phase: the new slots are empty and, being after every query,
    unread until written."""
    return state.replace(
        cache=self._constrain_cache({
            name: tuple(jnp.pad(buf, kv_cache.along_cache_slots(name, (0, extra_slots), (0, 0),
                                                                (0, 0)))
                        for buf in bufs)
            for name, bufs in state.cache.items()}),
        kv_mask=jnp.pad(state.kv_mask, ((0, 0), (0, extra_slots)), constant_values=True))

  def is_running(self, state: SamplingState):
    """False once every slot is done and no row waits for a slot."""
    return ~(jnp.all(state.slot_done) & (state.next_row >= self.num_rows))

  def _constrain_cache(self, cache):
    if self.cache_sharding is None:
      return cache
    return jax.lax.with_sharding_constraint(cache, self.cache_sharding)

  def _constrain_batch(self, x):
    if self.batch_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.batch_sharding)
