"""Decoder-only transformer covering Llama 3, Qwen2/2.5 and Qwen3 by flags (see ModelConfig).

RMSNorm, RoPE (with Llama-3 / linear scaling), grouped-query attention, SwiGLU, layers scanned
(`nn.scan`; unrolled up to 8 layers) so compile time does not grow with depth. Every parameter
carries logical axis names (`parallel.py` maps them onto the mesh). Positions and a segment-id
mask are explicit, so left-padded and packed batches are exact.

Parameters are a plain pytree (what `init` returns, what `hf.load` builds):
  embed/embedding [V, D]; lm_head/kernel [D, V] (untied only); final_norm/scale [D];
  layers/{attn_norm,mlp_norm}/scale [L, D];
  layers/attn/{q,k,v}_proj/kernel [L, D, heads, H] (+ bias [L, heads, H] with qkv_bias);
  layers/attn/o_proj/kernel [L, N, H, D]; layers/attn/{q,k}_norm/scale [L, H] (qk_norm);
  layers/mlp/{gate,up}/kernel [L, D, F]; layers/mlp/down/kernel [L, F, D].
With cfg.lora_rank > 0, each projection LoRA targets also holds lora_a [L, in dims, r] and
lora_b [L, r, out dims] (float32; see `_lora_update`; opsd_jax/lora.py splits and merges them).

Two entry points: `forward` (full sequence, no cache) and `forward_cached` (writes T new tokens
into a KV cache at a per-row slot and attends to everything the cache holds; prefill is T = the
prompt length, decode is T = 1). The cached path runs layers unrolled, over a stacked cache
(CACHE_LAYOUT behind a layer axis) or one buffer per layer (`init_cache(per_layer=True)`,
copy-free in a decode loop).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from opsd_jax.config import ModelConfig

Params = Any
_NEG_INF = -1e30  # finite, so a fully masked row (a pad query) gives a uniform softmax, not NaN

# Layout of one layer's KV cache buffers: heads before slots, so decode attention reads each
# head's cache without a transpose; keys with slots last, so each head's keys are a plain [H, S]
# matrix on the right of the q @ k dot. A CPU decode step with the keys [S, H] instead: 19.6-20.0
# against 16.7-17.4 ms at batch 8 with 1024 slots, 27.8 against 25.0 ms at batch 32 with 320.
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


def _dtype(name: str):
  return jnp.dtype(name)


def _param(module, name, init, shape, axes, cfg):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      _dtype(cfg.param_dtype))


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2], with the checkpoint's rope scaling applied (as transformers)."""
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / cfg.head_dim))
  scaling = cfg.rope_scaling_dict
  if scaling is None:
    return inv_freq
  if scaling["rope_type"] == "linear":
    return inv_freq / scaling["factor"]
  # llama3: long wavelengths slowed by `factor`, short kept, a smooth blend between.
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  low_wavelen, high_wavelen = old_len / low, old_len / high
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, blended, scaled)


def rope_tables(cfg: ModelConfig, positions):
  """(cos, sin) of the rotation angles of `positions` (any shape [...] -> [..., H/2]), computed
  once per forward and shared by every layer's q and k."""
  angles = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH, rope):
  """Rotates pairs (i, i + H/2), the convention of the HF Llama/Qwen checkpoints, by the angles
  of `rope_tables`."""
  cos, sin = (t[:, :, None, :] for t in rope)
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
  cfg: ModelConfig
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.cfg)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (x32 * scale.astype(jnp.float32)).astype(_dtype(self.cfg.dtype))


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, rope, mask_BTS, cache=None, cache_pos_B=None):
    cfg = self.cfg
    dt = _dtype(cfg.dtype)

    def proj(name, heads, head_axis):
      kernel = _Kernel(cfg, (cfg.d_model, heads, cfg.head_dim), ("embed", head_axis, "head_dim"),
                       bias_shape=(heads, cfg.head_dim) if cfg.qkv_bias else None,
                       bias_axes=(head_axis, "head_dim"), name=name)
      return kernel(x_BTD, "BTD,DNH->BTNH")

    q = proj("q_proj", cfg.n_heads, "heads")
    k = proj("k_proj", cfg.n_kv_heads, "kv_heads")
    v = proj("v_proj", cfg.n_kv_heads, "kv_heads")
    if cfg.qk_norm:
      q = RMSNorm(cfg, "head_dim", name="q_norm")(q)
      k = RMSNorm(cfg, "head_dim", name="k_norm")(k)
    q = apply_rope(q, rope)
    k = apply_rope(k, rope)

    B, T, N, H = q.shape
    # 1/sqrt(H) on q (T x N x H values), not on the scores (T x S x N), in f32 before the cast.
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(H))).astype(dt).reshape(
        B, T, cfg.n_kv_heads, N // cfg.n_kv_heads, H)
    new_cache = None
    if cache is not None:
      # cache = this layer's (k, v) buffers in CACHE_LAYOUT. Each row writes its T new slots at
      # its own position, in place: a vmapped dynamic_update_slice, i.e. a scatter with a batch
      # dim, which the partitioner keeps local when rows are sharded (explicit row indices made it
      # all-gather every update per step).
      def writer(name):
        def write(buf, new_TKH, pos):
          start = [0, 0, 0]
          start[CACHE_SLOT_AXIS[name] - 1] = pos
          return jax.lax.dynamic_update_slice(
              buf, new_TKH.transpose(_CACHE_PERM[name]).astype(buf.dtype), start)
        return jax.vmap(write)
      write_k, write_v = writer("k"), writer("v")

    if cache is None or T == cache[1].shape[CACHE_SLOT_AXIS["v"]]:
      # A whole sequence attending to itself: the training forward (attention_mask is causal) or
      # a prefill that fills the cache from slot 0 (forward_cached's mask, causal there too).
      specs = ("BSKH", "BSKH")
      if cache is not None:
        new_cache = k, v = write_k(cache[0], k, cache_pos_B), write_v(cache[1], v, cache_pos_B)
        specs = CACHE_LAYOUT["k"], CACHE_LAYOUT["v"]
      out_BKGTH = _causal_attention(q, k.astype(dt), v.astype(dt), mask_BTS, *specs)
    else:
      # New tokens on a filled cache (decode; a prefill in chunks): attention reads the cache as
      # it was and the new tokens beside it, then the new slots are written. Reading the written
      # buffers instead compiled, at batch 1, to a second update fusion and two copies of every
      # layer's cache per decode step.
      out_BKGTH = _attend_cache_and_new(q, cache[0].astype(dt), cache[1].astype(dt), k.astype(dt),
                                        v.astype(dt), mask_BTS, cache_pos_B)
      # The writes must follow that read, or XLA copies each buffer to keep its old value
      # readable (two copies per layer per step, at every batch size). Only a data dependency
      # orders them (XLA CPU drops optimization barriers before copy insertion): the new keys and
      # values plus 0 x the output, per (row, KV head), so nothing crosses devices.
      zero_B1K1 = 0 * out_BKGTH[:, :, 0, :1, :1].transpose(0, 2, 1, 3)
      new_cache = (write_k(cache[0], k + zero_B1K1, cache_pos_B),
                   write_v(cache[1], v + zero_B1K1, cache_pos_B))
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    kernel, lora = _Weight(cfg, (N, H, cfg.d_model), ("heads", "head_dim", "embed"),
                           name="o_proj")(out_BTNH, "BTNH,NHD->BTD")
    # As a 2-D matmul over flattened heads: contracting (N, H) as two dims let XLA permute the
    # loop-invariant kernel to the activation's layout at every decode step (1 MB per layer here).
    y = _project("BTNH,NHD->BTD", out_BTNH, kernel.astype(dt))
    return _plus(y, lora), new_cache


def _attend(q_BTKGH, k, v, mask_BTS, k_spec, v_spec):
  """Softmax attention of grouped queries over keys and values laid out as k_spec and v_spec
  (BSKH: the training forward's projections; CACHE_LAYOUT: cache buffers).
  Returns the dot's own output order [B, K, G, T, H]: asking einsum for BTKGH directly lets XLA
  pick an [.., H, G] layout that costs o_proj a transposed copy of its weights per decode step.

  The softmax's normalisation divides the [.., T, H] output, not the [.., T, S] probabilities: one
  pass fewer over the scores forward and backward (the 8 x 512 SFT step 2.74-2.89 -> 2.65-2.69 s
  on CPU). The max is a shift the softmax does not depend on, so no gradient flows through it."""
  scores = jnp.einsum(f"BTKGH,{k_spec}->BKGTS", q_BTKGH, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _NEG_INF)
  p = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  out = jnp.einsum(f"BKGTS,{v_spec}->BKGTH", p.astype(q_BTKGH.dtype), v)
  return out / p.sum(-1, keepdims=True).astype(out.dtype)


def _attend_cache_and_new(q_BTKGH, k_BKHS, v_BKSH, k_BTKH, v_BTKH, mask_BTS, cache_pos_B):
  """`_attend` over a cache (CACHE_LAYOUT) as it was *before* row b's T new slots (from
  cache_pos_b) were written, and over the new keys and values themselves: one softmax across both
  parts. mask_BTS is forward_cached's mask over the written cache; the old part keeps its slots
  before cache_pos_b, the new part its columns cache_pos_b .. cache_pos_b + T - 1."""
  T, S = q_BTKGH.shape[1], v_BKSH.shape[2]
  old_mask_BTS = mask_BTS & (jnp.arange(S)[None, None, :] < cache_pos_B[:, None, None])
  new_mask_BTT = jax.vmap(lambda m_TS, pos: jax.lax.dynamic_slice_in_dim(m_TS, pos, T, axis=1))(
      mask_BTS, cache_pos_B)
  # Queries head-major first (free at T = 1): from [B, T, K, G, H] XLA CPU put the cache on the
  # dot's left, transposed, and ran it 3x slower.
  q_BKGTH = q_BTKGH.transpose(0, 2, 3, 1, 4)
  old = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS, preferred_element_type=jnp.float32)
  new = jnp.einsum("BKGTH,BUKH->BKGTU", q_BKGTH, k_BTKH, preferred_element_type=jnp.float32)
  old = jnp.where(old_mask_BTS[:, None, None], old, _NEG_INF)
  new = jnp.where(new_mask_BTT[:, None, None], new, _NEG_INF)
  top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
  p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
  total = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
  dt = q_BTKGH.dtype
  return (jnp.einsum("BKGTS,BKSH->BKGTH", (p_old / total).astype(dt), v_BKSH)
          + jnp.einsum("BKGTU,BUKH->BKGTH", (p_new / total).astype(dt), v_BTKH))


# Causal attention over a whole sequence runs in this many query blocks, each against the keys up
# to its own end: (n + 1) / 2n of the T x T scores are computed instead of all, and each block's
# scores stay cache-sized. Measured on CPU at T = 512 (8 x 8 heads, forward + backward): 85 ms
# against 161 ms for one T x T pass. Blocks shorter than _MIN_QUERY_BLOCK are not worth a dot.
_CAUSAL_BLOCKS = 8
_MIN_QUERY_BLOCK = 64


def causal_block_edges(T: int) -> list[int]:
  """Query block boundaries [0, ..., T] of `_causal_attention` over T positions."""
  blocks = max(1, min(_CAUSAL_BLOCKS, T // _MIN_QUERY_BLOCK))
  return [round(i * T / blocks) for i in range(blocks + 1)]


def _causal_attention(q_BTKGH, k, v, mask_BTS, k_spec, v_spec):
  """`_attend` for a sequence attending to itself (S = T) under a causal mask_BTS: keys after a
  query block's last query are masked for all of it, so they are left out, not computed."""
  edges = causal_block_edges(q_BTKGH.shape[1])
  first = lambda x, spec, b: jax.lax.slice_in_dim(x, 0, b, axis=spec.index("S"))  # noqa: E731
  outs = [_attend(q_BTKGH[:, a:b], first(k, k_spec, b), first(v, v_spec, b),
                  mask_BTS[:, a:b, :b], k_spec, v_spec)
          for a, b in zip(edges[:-1], edges[1:])]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


class _Kernel(nn.Module):
  """A projection `x @ kernel (+ bias)` with named axes; einsum spec given at call time. When
  LoRA targets it (cfg.lora_targets, by this module's name), plus its adapter's update."""
  cfg: ModelConfig
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  bias_shape: tuple[int, ...] | None = None
  bias_axes: tuple[str, ...] | None = None

  @nn.compact
  def __call__(self, x, spec):
    dt = _dtype(self.cfg.dtype)
    kernel = _param(self, "kernel", nn.initializers.normal(0.02), self.shape, self.axes, self.cfg)
    y = _project(spec, x.astype(dt), kernel.astype(dt))
    if self.bias_shape is not None:
      bias = _param(self, "bias", nn.initializers.zeros, self.bias_shape, self.bias_axes, self.cfg)
      y = y + bias.astype(dt)
    return _plus(y, _lora_update(self, x, spec))


def _spec_parts(spec):
  """"x,kernel->y" -> (x, kernel, y): the projection einsums' three operand specs."""
  x_spec, rest = spec.split(",")
  return (x_spec, *rest.split("->"))


def _project(spec, x, kernel):
  """jnp.einsum(spec, x, kernel) for a projection whose contracted dims trail x and lead kernel
  ("BTD,DNH->BTNH", "BTNH,NHD->BTD"), run as ONE 2-D matmul over flattened dims. The reshapes are
  bitcasts, and the backward's transposed operand for dW is then a 2-D transpose, which XLA CPU
  copies ~5x faster than the equivalent 4-D one (the [B, T, N, H] -> [N, H, B, T] copies of the
  einsum form cost 7 vs 1.4 ms each at 8 x 512). Other specs fall back to the einsum."""
  x_spec, k_spec, y_spec = _spec_parts(spec)
  n_in = sum(c in x_spec for c in k_spec)
  if (k_spec[:n_in] != x_spec[len(x_spec) - n_in:]
      or y_spec != x_spec[:len(x_spec) - n_in] + k_spec[n_in:]):
    return jnp.einsum(spec, x, kernel)
  lead, out = x.shape[:x.ndim - n_in], kernel.shape[n_in:]
  y = jnp.dot(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(kernel.shape[:n_in]), -1))
  return y.reshape(*lead, *out)


class _Weight(nn.Module):
  """Just a named kernel parameter, for callers that run their own matmul with it (o_proj, the
  SwiGLU's gate and up); its LoRA update comes from `_lora_update(weight_module, x, spec)`
  (adapters live next to kernel)."""
  cfg: ModelConfig
  shape: tuple[int, ...]
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self, x, spec):
    """(kernel, the LoRA update of x @ kernel or None)."""
    kernel = _param(self, "kernel", nn.initializers.normal(0.02), self.shape, self.axes, self.cfg)
    return kernel, _lora_update(self, x, spec)


# --------------------------------------------------------------------------------------------
# LoRA: y = x @ W + (alpha / r) (x @ A) @ B, never a merged W + scale A @ B per step
# --------------------------------------------------------------------------------------------


def _plus(y, update):
  return y if update is None else y + update


def _lora_update(module, x, spec):
  """(alpha / r) (x @ A) @ B for the projection `module` (a _Kernel / _Weight with shape and axes;
  spec its einsum "x,kernel->y"), or None where LoRA does not target it. A [in dims, r] and
  B [r, out dims] carry the kernel's own logical axes, so they shard like it; B starts at 0, so a
  fresh adapter changes nothing. A parameter tree without the adapters (the base weights alone:
  OPSD's frozen teacher) runs with them off."""
  cfg = module.cfg
  if cfg.lora_rank == 0 or module.name not in cfg.lora_targets:
    return None
  if not module.is_initializing() and not module.has_variable("params", "lora_a"):
    return None
  x_spec, k_spec, y_spec = _spec_parts(spec)
  ins = [i for i, c in enumerate(k_spec) if c in x_spec]    # contracted with x
  outs = [i for i, c in enumerate(k_spec) if c not in x_spec]
  r = cfg.lora_rank
  in_shape, out_shape = [module.shape[i] for i in ins], [module.shape[i] for i in outs]
  # peft's default: A ~ kaiming-uniform (bound 1 / sqrt(fan_in)), B = 0.
  a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                            in_axis=tuple(range(len(ins))), out_axis=-1)
  a = module.param("lora_a", nn.with_logical_partitioning(
      a_init, tuple(module.axes[i] for i in ins) + ("lora_rank",)), (*in_shape, r), jnp.float32)
  b = module.param("lora_b", nn.with_logical_partitioning(
      nn.initializers.zeros, ("lora_rank",) + tuple(module.axes[i] for i in outs)),
      (r, *out_shape), jnp.float32)
  dt = _dtype(cfg.dtype)
  batch = "".join(c for c in x_spec if c not in k_spec)
  in_letters = "".join(k_spec[i] for i in ins)
  out_letters = "".join(k_spec[i] for i in outs)
  xa = jnp.einsum(f"{x_spec},{in_letters}R->{batch}R", x.astype(dt), a.astype(dt))
  delta = jnp.einsum(f"{batch}R,R{out_letters}->{y_spec}", xa, b.astype(dt))
  return (cfg.lora_alpha / r) * delta


@jax.custom_vjp
def _swiglu(x_BTD, gate_DF, up_DF, lora):
  """silu(x @ gate) * (x @ up), plus LoRA's updates of the two products when given (lora: None or
  (gate update, up update), each [B, T, F] or None).

  A hand-written backward over flattened tokens, four plain 2-D dots: autodiff of the fused form
  built the gate/up cotangent by padding and adding slices and ran its dots through transposed
  copies (fwd + bwd of one MLP at 8 x 512 on CPU: 210-218 ms against 265-293)."""
  return _swiglu_fwd(x_BTD, gate_DF, up_DF, lora)[0]


def _swiglu_fwd(x_BTD, gate_DF, up_DF, lora):
  B, T, D = x_BTD.shape
  x_ND = x_BTD.reshape(B * T, D)
  gate, up = x_ND @ gate_DF, x_ND @ up_DF
  if lora is not None:
    gate, up = [y if d is None else y + d.reshape(y.shape).astype(y.dtype)
                for y, d in zip((gate, up), lora)]
  h = (nn.silu(gate) * up).reshape(B, T, -1)
  return h, (x_ND, gate_DF, up_DF, gate, up, lora)


def _swiglu_bwd(res, d_h_BTF):
  x_ND, gate_DF, up_DF, gate, up, lora = res
  d_h = d_h_BTF.reshape(gate.shape)
  sig = jax.nn.sigmoid(gate)
  d_gate = d_h * up * (sig * (1 + gate * (1 - sig)))  # d silu(g) / dg = s (1 + g (1 - s))
  d_up = d_h * gate * sig
  d_x = jnp.einsum("NF,DF->ND", d_gate, gate_DF) + jnp.einsum("NF,DF->ND", d_up, up_DF)
  d_gate_DF, d_up_DF = x_ND.T @ d_gate, x_ND.T @ d_up
  if lora is not None:
    lora = tuple(None if d is None else g.reshape(d.shape).astype(d.dtype)
                 for d, g in zip(lora, (d_gate, d_up)))
  return d_x.reshape(d_h_BTF.shape[:2] + x_ND.shape[1:]), d_gate_DF, d_up_DF, lora


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def _tied_unembed(h_BTD, embedding_VD):
  """Logits h @ embedding^T. The backward forms the table's gradient as (h^T @ d_logits)^T:
  autodiff's d_logits^T @ h copied the [tokens, V] logit gradient to V-major first, a transpose
  of the largest array of the step (per 256-token chunk at V = 8192: 67 MB)."""
  return jnp.einsum("BTD,VD->BTV", h_BTD, embedding_VD)


def _tied_unembed_fwd(h_BTD, embedding_VD):
  return _tied_unembed(h_BTD, embedding_VD), (h_BTD, embedding_VD)


def _tied_unembed_bwd(res, d_logits_BTV):
  h_BTD, embedding_VD = res
  d_NV = d_logits_BTV.reshape(-1, d_logits_BTV.shape[-1])
  d_embedding = (h_BTD.reshape(-1, h_BTD.shape[-1]).T @ d_NV).T
  return (d_logits_BTV @ embedding_VD).astype(h_BTD.dtype), d_embedding.astype(embedding_VD.dtype)


_tied_unembed.defvjp(_tied_unembed_fwd, _tied_unembed_bwd)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    (gate_w, gate_lora), (up_w, up_lora) = [
        _Weight(cfg, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), name=name)(
            x_BTD, "BTD,DF->BTF") for name in ("gate", "up")]
    lora = None if gate_lora is None and up_lora is None else (gate_lora, up_lora)
    h = _swiglu(x_BTD.astype(dt), gate_w.astype(dt), up_w.astype(dt), lora)
    return _Kernel(cfg, (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), name="down")(h, "BTF,FD->BTD")


class Block(nn.Module):
  """One pre-norm layer: carry = (x, this layer's cache {"k", "v"} (CACHE_LAYOUT) or None), so
  a scan over layers (training) and the unrolled cached forward share it."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, _, rope, mask_BTS, cache_pos_B):
    x, cache = carry
    layer_cache = None if cache is None else (cache["k"], cache["v"])
    h, new_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x), rope, mask_BTS, layer_cache, cache_pos_B)
    x = x + h
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
    if cache is not None:
      cache = {"k": new_cache[0], "v": new_cache[1]}
    return (x, cache), None


# Shallow models unroll the layer scan: the scan's stacked residual and gradient buffers (zero-filled
# each step) cost ~7 % of a CPU train step at 6 layers; deep ones keep compile time flat.
_MAX_UNROLLED_LAYERS = 8


def _scan_unroll(cfg: ModelConfig) -> int:
  return cfg.n_layers if cfg.n_layers <= _MAX_UNROLLED_LAYERS else 1


def _batch_split(x_BTD):
  """Activations split over the data axes on their batch dim, when a mesh is in context (the
  train steps set one). Without it, FSDP's propagation shards them like the embedding table, over
  d_model, and every device holds the whole batch's activations (measured on 8 CPU devices:
  2-3.5x the per-device memory of a batch split, tests/test_memory.py)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names:
    return x_BTD
  return jax.lax.with_sharding_constraint(x_BTD, jax.sharding.PartitionSpec(("data", "fsdp")))


class Transformer(nn.Module):
  """The decoder over a whole sequence. mask_BTS must be causal (as `attention_mask` builds it):
  attention skips the keys after each query block. Outputs at padding queries (no key attended)
  are unspecified; nothing reads them."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), ("vocab", "embed")),
                          param_dtype=_dtype(cfg.param_dtype), dtype=_dtype(cfg.dtype))
    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if cfg.remat == "dots" else None)
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                          length=cfg.n_layers, unroll=_scan_unroll(cfg),
                          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _Kernel(cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def hidden(self, tokens_BT, positions_BT, mask_BTS):
    x = _batch_split(self.embed(tokens_BT))
    dummy = jnp.zeros((self.cfg.n_layers,), jnp.int32)
    # The tables row by row in a loop, whose outputs XLA must materialise: computed inline, XLA
    # fused sin and cos into all 36 RoPE fusions of a 6-layer train step (forward and backward),
    # evaluating them once per head per element, ~0.1 s of an 8 x 512 step on CPU.
    rope = jax.lax.map(lambda positions_T: rope_tables(self.cfg, positions_T), positions_BT)
    (x, _), _ = self.layers((x, None), dummy, rope, mask_BTS, None)
    return self.final_norm(x)

  def unembed(self, h_BTD):
    if self.cfg.tie_embeddings:
      dt = _dtype(self.cfg.dtype)
      return _tied_unembed(h_BTD.astype(dt), self.embed.embedding.astype(dt))
    return self.lm_head(h_BTD, "BTD,DV->BTV")

  def __call__(self, tokens_BT, positions_BT, mask_BTS):
    return self.unembed(self.hidden(tokens_BT, positions_BT, mask_BTS))


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def init(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters (a plain pytree, logical-axis metadata removed)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(cfg).init(rng, tokens, jnp.zeros((1, 1), jnp.int32),
                                    jnp.ones((1, 1, 1), bool))
  return nn.unbox(variables["params"])


def abstract_params(cfg: ModelConfig):
  """Shapes and logical axes of the parameters, without allocating them (boxed)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), tokens, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool)))["params"]


def attention_mask(segment_ids_BT):
  """[B, T, T] mask: same segment (0 = padding, never attended), and causal."""
  T = segment_ids_BT.shape[1]
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same & (segment_ids_BT[:, None, :] != 0) & jnp.tril(jnp.ones((T, T), bool))[None]


def positions_from_mask(mask_BT):
  """Positions that count only real tokens (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def _inputs(tokens_BT, mask_BT, positions_BT, segment_ids_BT):
  if segment_ids_BT is None:
    segment_ids_BT = (jnp.ones_like(tokens_BT) if mask_BT is None
                      else mask_BT.astype(jnp.int32))
  if positions_BT is None:
    positions_BT = positions_from_mask(segment_ids_BT != 0)
  return positions_BT, attention_mask(segment_ids_BT)


def forward(cfg: ModelConfig, params: Params, tokens_BT, mask_BT=None, positions_BT=None,
            segment_ids_BT=None):
  """Full forward, no cache. Returns logits [B, T, V] (float32).

  mask_BT marks real tokens (left padding = 0); positions default to counting real tokens.
  segment_ids_BT (packed sequences, 0 = padding) overrides mask_BT; pass positions with it.
  """
  positions_BT, mask_BTS = _inputs(tokens_BT, mask_BT, positions_BT, segment_ids_BT)
  logits = Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, mask_BTS)
  return logits.astype(jnp.float32)


def hidden_states(cfg: ModelConfig, params: Params, tokens_BT, mask_BT=None, positions_BT=None,
                  segment_ids_BT=None):
  """Final-norm hidden states [B, T, D]; pair with `unembed` to get logits chunk by chunk."""
  positions_BT, mask_BTS = _inputs(tokens_BT, mask_BT, positions_BT, segment_ids_BT)
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, mask_BTS,
                               method=Transformer.hidden)


def unembed(cfg: ModelConfig, params: Params, h_BTD):
  """Logits [B, T, V] (float32) from hidden states."""
  return Transformer(cfg).apply({"params": params}, h_BTD,
                                method=Transformer.unembed).astype(jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None, per_layer: bool = False):
  """An empty KV cache: k [L, B, K, H, S] and v [L, B, K, S, H] (CACHE_LAYOUT, behind a layer
  axis).

  per_layer=True gives k and v as tuples of L buffers (CACHE_LAYOUT) instead: each layer's buffer is
  then updated in place and read by attention directly, where slicing a layer out of the stacked
  buffer costs a copy of it per step (the form the sampler's decode loop carries)."""
  dtype = _dtype(cfg.dtype) if dtype is None else dtype
  sizes = dict(B=batch, K=cfg.n_kv_heads, S=length, H=cfg.head_dim)
  shapes = {name: tuple(sizes[a] for a in spec) for name, spec in CACHE_LAYOUT.items()}
  if per_layer:
    return {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
            for name, shape in shapes.items()}
  return {name: jnp.zeros((cfg.n_layers,) + shape, dtype) for name, shape in shapes.items()}


def unstack_layers(params: Params) -> Params:
  """params with "layers" split into a tuple of per-layer trees (`forward_cached` takes either).

  Inside a decode loop this moves the per-layer weight slicing out of the loop: done once, where
  the scanned stack would slice (copy, on CPU) every layer's weights at every step. Costs one extra
  copy of the layer weights while it lives."""
  stacked = params["layers"]
  n_layers = jax.tree.leaves(stacked)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda w: w[i], stacked)
                                    for i in range(n_layers))}


def forward_cached(cfg: ModelConfig, params: Params, tokens_BT, positions_BT, cache, cache_pos_B,
                   kv_mask_BS, last_only: bool = False):
  """Writes T tokens into cache slots [cache_pos_b, cache_pos_b + T) of each row b and attends,
  causally, to every valid slot. `kv_mask_BS` marks the valid slots *including* the new ones.

  The cache is either form of `init_cache` (stacked or per_layer) and comes back in the same form;
  params may be stacked or `unstack_layers`'d. Layers run unrolled (not scanned), so each layer's
  cache buffer is updated in place and read without a copy. last_only unembeds only position T - 1.

  Returns (logits [B, T, V] float32 ([B, 1, V] with last_only), new cache).
  """
  stacked_cache = not isinstance(cache["k"], (tuple, list))
  S = (cache["k"] if stacked_cache else cache["k"][0]).shape[CACHE_SLOT_AXIS["k"] + stacked_cache]
  T = tokens_BT.shape[1]
  slot_S = jnp.arange(S)
  query_slot_BT = cache_pos_B[:, None] + jnp.arange(T)[None, :]
  mask_BTS = kv_mask_BS[:, None, :] & (slot_S[None, None, :] <= query_slot_BT[:, :, None])

  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    layer_params = list(layers)
  else:
    layer_params = [jax.tree.map(lambda w, i=i: w[i], layers) for i in range(cfg.n_layers)]
  outer = {"params": {name: p for name, p in params.items() if name != "layers"}}
  module = Transformer(cfg)
  x = module.apply(outer, tokens_BT, method=lambda m, t: m.embed(t))
  rope = rope_tables(cfg, positions_BT)
  new_k, new_v = [], []
  for i, lp in enumerate(layer_params):
    (x, layer_cache), _ = Block(cfg).apply(
        {"params": lp}, (x, {"k": cache["k"][i], "v": cache["v"][i]}), None, rope, mask_BTS,
        cache_pos_B)
    new_k.append(layer_cache["k"])
    new_v.append(layer_cache["v"])
  if last_only:
    x = x[:, -1:]
  logits = module.apply(outer, x, method=lambda m, h: m.unembed(m.final_norm(h)))
  if stacked_cache:
    cache = {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}
  else:
    cache = {"k": tuple(new_k), "v": tuple(new_v)}
  return logits.astype(jnp.float32), cache
