"""Decoder-only transformer covering Llama 3, Qwen2/2.5 and Qwen3 by flags (see ModelConfig).

RMSNorm, RoPE (with Llama-3 / linear scaling), grouped-query attention, SwiGLU, layers scanned
(`nn.scan`; unrolled when shallow) so compile time does not grow with depth. Every parameter
carries logical axis names (`parallel.py` maps them onto the mesh). Positions and a segment-id
mask are explicit, so left-padded and packed batches are exact.

This file is the architecture; the XLA:CPU-tuned forms of its matmuls, SwiGLU, unembedding and
attention are in `kernels.py`, the KV cache's layout and its attention in `kv_cache.py`.

Parameters are a plain pytree (what `init` returns, what `hf.load` builds):
  embed/embedding [V, D]; lm_head/kernel [D, V] (untied only); final_norm/scale [D];
  layers/{attn_norm,mlp_norm}/scale [L, D];
  layers/attn/{q,k,v}_proj/kernel [L, D, heads, H] (+ bias [L, heads, H] with qkv_bias);
  layers/attn/o_proj/kernel [L, N, H, D]; layers/attn/{q,k}_norm/scale [L, H] (qk_norm);
  layers/mlp/{gate,up}/kernel [L, D, F]; layers/mlp/down/kernel [L, F, D].
With cfg.lora_rank > 0, each projection LoRA targets also holds lora_a [L, in dims, r] and
lora_b [L, r, out dims] (float32; see `_lora_update`; opsd_jax/lora.py splits and merges them).

Entry points: `forward` (full sequence, no cache; `hidden_states` + `unembed` in two halves) and
`forward_cached` (writes T new tokens into a KV cache at a per-row slot and attends to everything
the cache holds; prefill is T = the prompt length, decode is T = 1).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from opsd_jax import kernels, kv_cache
from opsd_jax.config import ModelConfig

Params = Any


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
# Projections: named kernels (kernels.project runs the matmul), plus LoRA where it targets them
# --------------------------------------------------------------------------------------------


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
    y = kernels.project(spec, x.astype(dt), kernel.astype(dt))
    if self.bias_shape is not None:
      bias = _param(self, "bias", nn.initializers.zeros, self.bias_shape, self.bias_axes, self.cfg)
      y = y + bias.astype(dt)
    return _plus(y, _lora_update(self, x, spec))


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
  x_spec, k_spec, y_spec = kernels.spec_parts(spec)
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
  """Grouped-query attention. Without a cache, a sequence attends to itself (mask_BTS causal);
  with one (this layer's (k, v) buffers, kv_cache.CACHE_LAYOUT), the T new tokens are written at
  each row's cache_pos and attend to every valid slot. Returns (y, the new cache or None)."""
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
    if cache is None:
      new_cache = None
      out_BKGTH = kernels.causal_attention(q, k.astype(dt), v.astype(dt), mask_BTS, "BSKH", "BSKH")
    else:
      out_BKGTH, new_cache = kv_cache.attend_and_write(q, k, v, mask_BTS, cache, cache_pos_B)
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    kernel, lora = _Weight(cfg, (N, H, cfg.d_model), ("heads", "head_dim", "embed"),
                           name="o_proj")(out_BTNH, "BTNH,NHD->BTD")
    y = kernels.project("BTNH,NHD->BTD", out_BTNH, kernel.astype(dt))
    return _plus(y, lora), new_cache


class MLP(nn.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    (gate_w, gate_lora), (up_w, up_lora) = [
        _Weight(cfg, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), name=name)(
            x_BTD, "BTD,DF->BTF") for name in ("gate", "up")]
    lora = None if gate_lora is None and up_lora is None else (gate_lora, up_lora)
    h = kernels.swiglu(x_BTD.astype(dt), gate_w.astype(dt), up_w.astype(dt), lora)
    return _Kernel(cfg, (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), name="down")(h, "BTF,FD->BTD")


class Block(nn.Module):
  """One pre-norm layer: carry = (x, this layer's cache {"k", "v"} (kv_cache.CACHE_LAYOUT) or
  None), so a scan over layers (training) and the unrolled cached forward share it."""
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
                          length=cfg.n_layers, unroll=kernels.scan_unroll(cfg.n_layers),
                          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _Kernel(cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def hidden(self, tokens_BT, positions_BT, mask_BTS):
    x = kernels.batch_split(self.embed(tokens_BT))
    dummy = jnp.zeros((self.cfg.n_layers,), jnp.int32)
    rope = kernels.rope_tables_per_row(lambda positions_T: rope_tables(self.cfg, positions_T),
                                       positions_BT)
    (x, _), _ = self.layers((x, None), dummy, rope, mask_BTS, None)
    return self.final_norm(x)

  def unembed(self, h_BTD):
    if self.cfg.tie_embeddings:
      dt = _dtype(self.cfg.dtype)
      return kernels.tied_unembed(h_BTD.astype(dt), self.embed.embedding.astype(dt))
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


# --------------------------------------------------------------------------------------------
# Cached forward (prefill and decode; the cache itself: kv_cache.py)
# --------------------------------------------------------------------------------------------


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

  The cache is either form of `kv_cache.init_cache` (stacked or per_layer) and comes back in the
  same form; params may be stacked or `unstack_layers`'d. Layers run unrolled (not scanned), so
  each layer's cache buffer is updated in place and read without a copy. last_only unembeds only
  position T - 1.

  Returns (logits [B, T, V] float32 ([B, 1, V] with last_only), new cache).
  """
  stacked_cache = not isinstance(cache["k"], (tuple, list))
  mask_BTS = kv_cache.causal_mask(kv_mask_BS, cache_pos_B, tokens_BT.shape[1])
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
