"""The model's hand-tuned pieces: each computes what its plain jnp form does, shaped so XLA:CPU
compiles it well. `model.py` reads as the architecture; this file says why each kernel exists.

Benches that justify them (the numbers live in docs/benchmarks.md, not here):
  python bench/train_step.py --iters 3   # SFT/GRPO/OPSD steps: swiglu, tied_unembed, project,
                                         # attend's normalisation, causal_attention's blocks
  python bench/forward.py                # forward and forward + backward at 8 x 512
  python bench/sampler.py --only ours    # decode: project's 2-D o_proj, attend's output order
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row (a pad query) gives a uniform softmax, not NaN


# --------------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------------


def spec_parts(spec):
  """"x,kernel->y" -> (x, kernel, y): the projection einsums' three operand specs."""
  x_spec, rest = spec.split(",")
  return (x_spec, *rest.split("->"))


def project(spec, x, kernel):
  """jnp.einsum(spec, x, kernel) for a projection whose contracted dims trail x and lead kernel
  ("BTD,DNH->BTNH", "BTNH,NHD->BTD"), run as ONE 2-D matmul over flattened dims.

  Why: the reshapes are bitcasts, and the backward's transposed operand for dW is then a 2-D
  transpose, which XLA CPU copies several times faster than the einsum form's 4-D
  [B, T, N, H] -> [N, H, B, T] one; for o_proj it also stops XLA permuting the loop-invariant
  kernel at every decode step (bench/train_step.py, bench/sampler.py). Other specs fall back to
  the einsum."""
  x_spec, k_spec, y_spec = spec_parts(spec)
  n_in = sum(c in x_spec for c in k_spec)
  if (k_spec[:n_in] != x_spec[len(x_spec) - n_in:]
      or y_spec != x_spec[:len(x_spec) - n_in] + k_spec[n_in:]):
    return jnp.einsum(spec, x, kernel)
  lead, out = x.shape[:x.ndim - n_in], kernel.shape[n_in:]
  y = jnp.dot(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(kernel.shape[:n_in]), -1))
  return y.reshape(*lead, *out)


# --------------------------------------------------------------------------------------------
# SwiGLU and the tied unembedding: custom backward passes
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def swiglu(x_BTD, gate_DF, up_DF, lora):
  """silu(x @ gate) * (x @ up), plus LoRA's updates of the two products when given (lora: None or
  (gate update, up update), each [B, T, F] or None).

  Why: a hand-written backward over flattened tokens, four plain 2-D dots; autodiff of the fused
  form built the gate/up cotangent by padding and adding slices and ran its dots through
  transposed copies (bench/train_step.py)."""
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


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def tied_unembed(h_BTD, embedding_VD):
  """Logits h @ embedding^T.

  Why: the backward forms the table's gradient as (h^T @ d_logits)^T; autodiff's
  d_logits^T @ h copied the [tokens, V] logit gradient to V-major first, a transpose of the
  largest array of the step (bench/train_step.py)."""
  return jnp.einsum("BTD,VD->BTV", h_BTD, embedding_VD)


def _tied_unembed_fwd(h_BTD, embedding_VD):
  return tied_unembed(h_BTD, embedding_VD), (h_BTD, embedding_VD)


def _tied_unembed_bwd(res, d_logits_BTV):
  h_BTD, embedding_VD = res
  d_NV = d_logits_BTV.reshape(-1, d_logits_BTV.shape[-1])
  d_embedding = (h_BTD.reshape(-1, h_BTD.shape[-1]).T @ d_NV).T
  return (d_logits_BTV @ embedding_VD).astype(h_BTD.dtype), d_embedding.astype(embedding_VD.dtype)


tied_unembed.defvjp(_tied_unembed_fwd, _tied_unembed_bwd)


# --------------------------------------------------------------------------------------------
# Attention over a whole sequence
# --------------------------------------------------------------------------------------------


def attend(q_BTKGH, k, v, mask_BTS, k_spec, v_spec):
  """Softmax attention of grouped queries over keys and values laid out as k_spec and v_spec
  (BSKH: the training forward's projections; kv_cache.CACHE_LAYOUT: cache buffers).

  Returns the dot's own output order [B, K, G, T, H]. Why: asking einsum for BTKGH directly lets
  XLA pick an [.., H, G] layout that costs o_proj a transposed copy of its weights per decode
  step (bench/sampler.py). The softmax's normalisation divides the [.., T, H] output, not the
  [.., T, S] probabilities: one pass fewer over the scores forward and backward
  (bench/train_step.py). The max is a shift the softmax does not depend on, so no gradient flows
  through it."""
  scores = jnp.einsum(f"BTKGH,{k_spec}->BKGTS", q_BTKGH, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask_BTS[:, None, None, :, :], scores, NEG_INF)
  p = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  out = jnp.einsum(f"BKGTS,{v_spec}->BKGTH", p.astype(q_BTKGH.dtype), v)
  return out / p.sum(-1, keepdims=True).astype(out.dtype)


# Causal attention over a whole sequence runs in this many query blocks, each against the keys up
# to its own end: (n + 1) / 2n of the T x T scores are computed instead of all, and each block's
# scores stay cache-sized (bench/train_step.py, bench/forward.py). Blocks shorter than
# _MIN_QUERY_BLOCK are not worth a dot.
_CAUSAL_BLOCKS = 8
_MIN_QUERY_BLOCK = 64


def causal_block_edges(T: int) -> list[int]:
  """Query block boundaries [0, ..., T] of `causal_attention` over T positions."""
  blocks = max(1, min(_CAUSAL_BLOCKS, T // _MIN_QUERY_BLOCK))
  return [round(i * T / blocks) for i in range(blocks + 1)]


def causal_attention(q_BTKGH, k, v, mask_BTS, k_spec, v_spec):
  """`attend` for a sequence attending to itself (S = T) under a causal mask_BTS: keys after a
  query block's last query are masked for all of it, so they are left out, not computed."""
  edges = causal_block_edges(q_BTKGH.shape[1])
  first = lambda x, spec, b: jax.lax.slice_in_dim(x, 0, b, axis=spec.index("S"))  # noqa: E731
  outs = [attend(q_BTKGH[:, a:b], first(k, k_spec, b), first(v, v_spec, b),
                 mask_BTS[:, a:b, :b], k_spec, v_spec)
          for a, b in zip(edges[:-1], edges[1:])]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


# --------------------------------------------------------------------------------------------
# Layout of the layer stack and its activations
# --------------------------------------------------------------------------------------------


def rope_tables_per_row(tables_of_positions, positions_BT):
  """tables_of_positions(positions_T) for each row, in a loop whose outputs XLA must materialise.

  Why: computed inline, XLA fused sin and cos into every RoPE fusion of a train step (forward and
  backward), evaluating them once per head per element (bench/train_step.py)."""
  return jax.lax.map(tables_of_positions, positions_BT)


# Shallow models unroll the layer scan: the scan's stacked residual and gradient buffers
# (zero-filled each step) cost a visible share of a CPU train step at 6 layers
# (bench/train_step.py); deep ones keep compile time flat.
_MAX_UNROLLED_LAYERS = 8


def scan_unroll(n_layers: int) -> int:
  """The layer scan's unroll factor: all layers up to _MAX_UNROLLED_LAYERS, else 1."""
  return n_layers if n_layers <= _MAX_UNROLLED_LAYERS else 1


def batch_split(x_BTD):
  """Activations split over the data axes on their batch dim, when a mesh is in context (the
  train steps set one). Why: without it, FSDP's propagation shards them like the embedding table,
  over d_model, and every device holds the whole batch's activations (tests/test_memory.py)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names:
    return x_BTD
  return jax.lax.with_sharding_constraint(x_BTD, jax.sharding.PartitionSpec(("data", "fsdp")))
