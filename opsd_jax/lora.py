"""LoRA: low-rank adapters on the attention and MLP projections, trained while the base is frozen.

The model applies them in the forward pass (model._lora_update): y = x W + (alpha / r) (x A) B,
with A [in dims, r], B [r, out dims] stored next to each targeted kernel as `lora_a` / `lora_b`
(float32), B = 0 at the start. No merged W + scale A B is built per step; the sampler decodes with
the same in-forward update. What LoRA changes around the model:

  * params are two trees: the base (exactly `model.init`'s tree without LoRA, e.g. a stage's
    input) and the adapters (only lora_a / lora_b leaves). `combine` puts them side by side
    (dict merge, no copy); the base alone runs with the adapters off, which is OPSD's frozen
    teacher: no second copy of the model.
  * the train state's `params` are the adapters (all the optimizer sees); the base rides in
    `base_params`, never donated or updated (train/state.py, train/steps.py).
  * a stage ends by merging (`merge`): its output is plain parameters, so evaluation, the next
    stage (with fresh adapters on that output) and `hf.save` need nothing LoRA-specific.

Peers: qwix (tunix's LoRA) intercepts einsums and adds A over the contracting dims and B over the
output dims, as here; tunix and peft then train only those leaves by a filter, as the split here.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from opsd_jax import model, parallel
from opsd_jax.config import ModelConfig

ADAPTER_LEAVES = ("lora_a", "lora_b")
Params = Any


def with_config(model_cfg: ModelConfig, lora_section) -> ModelConfig:
  """model_cfg with the experiment's `lora` section (rank, alpha, targets) applied."""
  return model_cfg.replace(lora_rank=int(lora_section.rank), lora_alpha=float(lora_section.alpha),
                           lora_targets=tuple(lora_section.targets))


def enabled(model_cfg: ModelConfig) -> bool:
  return model_cfg.lora_rank > 0


def base_config(model_cfg: ModelConfig) -> ModelConfig:
  return model_cfg.replace(lora_rank=0)


def scale(model_cfg: ModelConfig) -> float:
  return model_cfg.lora_alpha / model_cfg.lora_rank


# --------------------------------------------------------------------------------------------
# Trees: base + adapters
# --------------------------------------------------------------------------------------------


def split(params: Params) -> tuple[Params, Params]:
  """(base, adapters) of a tree holding both; subtrees without adapters are absent from the
  adapters tree."""
  base, adapters = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      b, a = split(value)
      base[key] = b
      if a:
        adapters[key] = a
    elif key in ADAPTER_LEAVES:
      adapters[key] = value
    else:
      base[key] = value
  return base, adapters


def combine(base: Params | None, adapters: Params | None) -> Params:
  """One tree with both (the arrays themselves, not copies). adapters None = the base alone;
  base None (no LoRA: the trained params are the whole model) = adapters as they are."""
  if adapters is None or base is None:
    return base if adapters is None else adapters
  out = dict(base)
  for key, value in adapters.items():
    if isinstance(value, dict):
      if not isinstance(base.get(key), dict):
        raise ValueError(f"lora.combine: adapters have {key!r}, the base tree does not")
      out[key] = combine(base[key], value)
    else:
      out[key] = value
  return out


def has_adapters(params: Params) -> bool:
  return bool(split(params)[1]) if isinstance(params, dict) else False


def abstract_adapters(model_cfg: ModelConfig) -> Params:
  """Shapes (and logical axes, boxed) of the adapters of a LoRA model config."""
  return split(model.abstract_params(model_cfg))[1]


def adapter_shardings(model_cfg: ModelConfig, mesh) -> Params:
  """Shardings of the adapters: each takes its kernel's logical axes (A: the input dims', B: the
  output dims'); the rank axis is replicated."""
  return split(parallel.param_shardings(model_cfg, mesh))[1]


def init_adapters(model_cfg: ModelConfig, rng: jax.Array, mesh=None, shardings=None) -> Params:
  """Fresh adapters (A random, B zero) in their shards (`shardings`, the stage's, or computed
  from the mesh); the base init is traced but unused, so XLA drops it."""
  if not enabled(model_cfg):
    raise ValueError("lora.init_adapters: lora rank is 0 (LoRA off)")
  fn = lambda key: split(model.init(model_cfg, key))[1]  # noqa: E731
  if mesh is None:
    return jax.jit(fn)(rng)
  shardings = adapter_shardings(model_cfg, mesh) if shardings is None else shardings
  return jax.jit(fn, out_shardings=shardings)(rng)


# --------------------------------------------------------------------------------------------
# Merging (end of a stage, export)
# --------------------------------------------------------------------------------------------


def _merged_kernel(kernel, a, b, s):
  """kernel + s A B per layer: A [L, in..., r], B [L, r, out...]; kernel [L, in..., out...]."""
  delta = jax.vmap(lambda a_l, b_l: jnp.tensordot(a_l, b_l, axes=1))(a, b)
  return (kernel.astype(jnp.float32) + s * delta).astype(kernel.dtype)


def _merge_tree(base, adapters, s):
  out = dict(base)
  for key, value in adapters.items():
    sub = base[key]
    if "lora_a" in value:
      out[key] = dict(sub, kernel=_merged_kernel(sub["kernel"], value["lora_a"], value["lora_b"],
                                                 s))
    else:
      out[key] = _merge_tree(sub, value, s)
  return out


def merge(model_cfg: ModelConfig, params: Params, adapters: Params | None = None,
          mesh=None, out_shardings=None) -> Params:
  """Plain parameters (the base tree's structure and dtype) with W + (alpha / r) A B folded into
  every adapted kernel. Takes base + adapters, or one tree holding both. A new tree: the inputs
  stay valid. With a mesh, the result lands in the base parameters' shardings (`out_shardings`,
  the stage's, or computed from the mesh)."""
  base, found = split(params)
  adapters = found if adapters is None else adapters
  if not adapters:
    return base
  if not enabled(model_cfg):
    raise ValueError("lora.merge: the params hold adapters but the model config's lora_rank is 0")
  fn = lambda b, a: _merge_tree(b, a, scale(model_cfg))  # noqa: E731
  if mesh is None:
    return jax.jit(fn)(base, adapters)
  if out_shardings is None:
    out_shardings = parallel.param_shardings(base_config(model_cfg), mesh)
  return jax.jit(fn, out_shardings=out_shardings)(base, adapters)


def num_adapter_params(model_cfg: ModelConfig) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(abstract_adapters(model_cfg))))
