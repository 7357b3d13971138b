"""The KV cache: its buffers' layout, an empty cache, and attention that writes new tokens into it.

`model.forward_cached` runs the decoder over a cache through `attend_and_write`; the sampler
(opsd_jax/sampler_loop.py) creates, refills and grows the buffers with `init_cache` and
`along_cache_slots`. Choices here are timed by `python bench/sampler.py --only ours,position`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from opsd_jax import kernels
from opsd_jax.config import ModelConfig

# Layout of one layer's KV cache buffers: heads before slots, so decode attention reads each
# head's cache without a transpose; keys with slots last, so each head's keys are a plain [H, S]
# matrix on the right of the q @ k dot (keys [S, H] decode slower: bench/sampler.py).
CACHE_LAYOUT = {"k": "BKHS", "v": "BKSH"}
CACHE_SLOT_AXIS = {name: spec.index("S") for name, spec in CACHE_LAYOUT.items()}
# A row's new keys or values [T, K, H] (their T slots) transposed to a buffer row's layout.
_CACHE_PERM = {name: tuple("SKH".index(a) for a in spec[1:])
               for name, spec in CACHE_LAYOUT.items()}


def along_cache_slots(name, slots, rows, other):
  """An index (or jnp.pad widths) over the axes of one layer's cache buffer `name` (k or v, in
  CACHE_LAYOUT): `rows` on the batch axis, `slots` on the slot axis, `other` on the head axes."""
  out = [other] * 4
  out[0], out[CACHE_SLOT_AXIS[name]] = rows, slots
  return tuple(out)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None, per_layer: bool = False):
  """An empty KV cache: k [L, B, K, H, S] and v [L, B, K, S, H] (CACHE_LAYOUT, behind a layer
  axis).

  per_layer=True gives k and v as tuples of L buffers (CACHE_LAYOUT) instead: each layer's buffer is
  then updated in place and read by attention directly, where slicing a layer out of the stacked
  buffer costs a copy of it per step (the form the sampler's decode loop carries)."""
  dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
  sizes = dict(B=batch, K=cfg.n_kv_heads, S=length, H=cfg.head_dim)
  shapes = {name: tuple(sizes[a] for a in spec) for name, spec in CACHE_LAYOUT.items()}
  if per_layer:
    return {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
            for name, shape in shapes.items()}
  return {name: jnp.zeros((cfg.n_layers,) + shape, dtype) for name, shape in shapes.items()}


def causal_mask(kv_mask_BS, cache_pos_B, T: int):
  """[B, T, S]: new token t of row b (slot cache_pos_b + t) sees the valid slots up to its own."""
  S = kv_mask_BS.shape[1]
  slot_S = jnp.arange(S)
  query_slot_BT = cache_pos_B[:, None] + jnp.arange(T)[None, :]
  return kv_mask_BS[:, None, :] & (slot_S[None, None, :] <= query_slot_BT[:, :, None])


def _writer(name):
  """Writes each row's T new slots at its own position, in place: a vmapped
  dynamic_update_slice, i.e. a scatter with a batch dim, which the partitioner keeps local when
  rows are sharded (explicit row indices made it all-gather every update per step)."""
  def write(buf, new_TKH, pos):
    start = [0, 0, 0]
    start[CACHE_SLOT_AXIS[name] - 1] = pos
    return jax.lax.dynamic_update_slice(
        buf, new_TKH.transpose(_CACHE_PERM[name]).astype(buf.dtype), start)
  return jax.vmap(write)


def attend_and_write(q_BTKGH, k_BTKH, v_BTKH, mask_BTS, cache, cache_pos_B):
  """Attention of T new tokens over one layer's cache (k, v buffers in CACHE_LAYOUT), writing
  their keys and values at slots cache_pos_b ... Returns (out [B, K, G, T, H], new cache)."""
  dt = q_BTKGH.dtype
  write_k, write_v = _writer("k"), _writer("v")
  if k_BTKH.shape[1] == cache[1].shape[CACHE_SLOT_AXIS["v"]]:
    # A prefill that fills the cache from slot 0: the sequence attends to itself (causal mask).
    new_cache = k, v = write_k(cache[0], k_BTKH, cache_pos_B), write_v(cache[1], v_BTKH,
                                                                      cache_pos_B)
    out_BKGTH = kernels.causal_attention(q_BTKGH, k.astype(dt), v.astype(dt), mask_BTS,
                                         CACHE_LAYOUT["k"], CACHE_LAYOUT["v"])
    return out_BKGTH, new_cache
  # New tokens on a filled cache (decode; a prefill in chunks): attention reads the cache as it
  # was and the new tokens beside it, then the new slots are written. Reading the written buffers
  # instead compiled, at batch 1, to a second update fusion and two copies of every layer's cache
  # per decode step.
  out_BKGTH = _attend_cache_and_new(q_BTKGH, cache[0].astype(dt), cache[1].astype(dt),
                                    k_BTKH.astype(dt), v_BTKH.astype(dt), mask_BTS, cache_pos_B)
  # The writes must follow that read, or XLA copies each buffer to keep its old value readable
  # (two copies per layer per step, at every batch size). Only a data dependency orders them (XLA
  # CPU drops optimization barriers before copy insertion): the new keys and values plus 0 x the
  # output, per (row, KV head), so nothing crosses devices.
  zero_B1K1 = 0 * out_BKGTH[:, :, 0, :1, :1].transpose(0, 2, 1, 3)
  new_cache = (write_k(cache[0], k_BTKH + zero_B1K1, cache_pos_B),
               write_v(cache[1], v_BTKH + zero_B1K1, cache_pos_B))
  return out_BKGTH, new_cache


def _attend_cache_and_new(q_BTKGH, k_BKHS, v_BKSH, k_BTKH, v_BTKH, mask_BTS, cache_pos_B):
  """`kernels.attend` over a cache (CACHE_LAYOUT) as it was *before* row b's T new slots (from
  cache_pos_b) were written, and over the new keys and values themselves: one softmax across both
  parts. mask_BTS is `causal_mask` over the written cache; the old part keeps its slots before
  cache_pos_b, the new part its columns cache_pos_b .. cache_pos_b + T - 1."""
  T, S = q_BTKGH.shape[1], v_BKSH.shape[2]
  old_mask_BTS = mask_BTS & (jnp.arange(S)[None, None, :] < cache_pos_B[:, None, None])
  new_mask_BTT = jax.vmap(lambda m_TS, pos: jax.lax.dynamic_slice_in_dim(m_TS, pos, T, axis=1))(
      mask_BTS, cache_pos_B)
  # Queries head-major first (free at T = 1): from [B, T, K, G, H] XLA CPU put the cache on the
  # dot's left, transposed, and ran it several times slower (bench/sampler.py).
  q_BKGTH = q_BTKGH.transpose(0, 2, 3, 1, 4)
  old = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS, preferred_element_type=jnp.float32)
  new = jnp.einsum("BKGTH,BUKH->BKGTU", q_BKGTH, k_BTKH, preferred_element_type=jnp.float32)
  old = jnp.where(old_mask_BTS[:, None, None], old, kernels.NEG_INF)
  new = jnp.where(new_mask_BTT[:, None, None], new, kernels.NEG_INF)
  top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
  p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
  total = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
  dt = q_BTKGH.dtype
  return (jnp.einsum("BKGTS,BKSH->BKGTH", (p_old / total).astype(dt), v_BKSH)
          + jnp.einsum("BKGTU,BUKH->BKGTH", (p_new / total).astype(dt), v_BTKH))
