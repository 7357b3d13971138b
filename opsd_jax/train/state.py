"""The train state every step consumes and returns, and its shardings on a mesh.

With LoRA (model_cfg.lora_rank > 0) `params` are the adapters only, so the optimizer state is
adapter-shaped; the frozen base sits in `base_params`, which the steps take as a separate,
never-donated argument and hand back as the same buffers (train/steps.py)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from opsd_jax import lora, model, parallel


@flax.struct.dataclass
class TrainState:
  """step: updates applied so far (int32); rng: a key the loops split from; teacher_params: the
  OPSD teacher (frozen snapshot or EMA), None otherwise (and for teacher='current'; with LoRA an
  EMA of the adapters, and None for 'frozen', whose teacher is base_params alone);
  skipped_steps: updates skipped because the loss or gradient was not finite; base_params: the
  frozen base under LoRA adapters (None without LoRA)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  teacher_params: Any = None
  skipped_steps: jax.Array | None = None
  base_params: Any = None


@dataclasses.dataclass(frozen=True)
class ParamShardings:
  """A stage's parameter shardings, computed once per stage and passed to everything that jits
  with them (parallel.param_shardings walks the model's whole abstract init each time).
  model: the tree the model runs with (with LoRA: base + adapters in one tree); trained: what
  the optimizer updates (the adapters with LoRA); base: the frozen LoRA base (None without)."""
  model: Any
  trained: Any
  base: Any = None


def param_shardings(model_cfg, mesh, model_shardings=None) -> ParamShardings:
  """ParamShardings of a model config on a mesh; `model_shardings` (e.g. the stage sampler's
  param_shardings) saves computing them again."""
  if model_shardings is None:
    model_shardings = parallel.param_shardings(model_cfg, mesh)
  if not lora.enabled(model_cfg):
    return ParamShardings(model_shardings, model_shardings)
  base, adapters = lora.split(model_shardings)
  return ParamShardings(model_shardings, adapters, base)


def create(params, optimizer: optax.GradientTransformation, rng, teacher_params=None, *,
           model_cfg=None, mesh=None, base_params=None,
           shardings: ParamShardings | None = None) -> TrainState:
  """A fresh state around existing params (and teacher, copied into its own buffers). With a
  mesh (and the model_cfg), everything is placed in the shardings the steps expect (`shardings`,
  or computed). With LoRA, params are the adapters and base_params the frozen base (kept as is,
  not copied)."""
  if mesh is not None and shardings is None:
    shardings = param_shardings(model_cfg, mesh)
  if base_params is not None:
    if mesh is not None:  # a no-op where it already sits there (what the pipeline passes)
      base_params = jax.device_put(base_params, shardings.base)
    state = create(params, optimizer, rng, teacher_params, model_cfg=model_cfg, mesh=mesh,
                   shardings=shardings)
    return state.replace(base_params=base_params)
  def build(params, teacher_params, rng):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng, teacher_params=teacher_params,
                      skipped_steps=jnp.zeros((), jnp.int32))
  if teacher_params is not None:  # own buffers: the step donates params and teacher separately
    teacher_params = jax.tree.map(lambda x: x.copy(), teacher_params)
  if mesh is None:
    return build(params, teacher_params, rng)
  if model_cfg is None:
    raise ValueError("state.create: pass model_cfg together with mesh")
  out = state_shardings(model_cfg, optimizer, mesh, teacher=teacher_params is not None,
                        shardings=shardings)
  return jax.jit(build, out_shardings=out)(params, teacher_params, rng)


def shardings_like(abstract_params, optimizer, mesh, teacher: bool, param_sharding):
  """TrainState of shardings: params (and teacher) as param_sharding, optimizer moments like
  their parameters, everything else replicated."""
  replicated = parallel.replicated(mesh)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sharding = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sharding,
                                       transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sharding, opt_state=opt_sharding,
                    rng=replicated, teacher_params=param_sharding if teacher else None,
                    skipped_steps=replicated)


def state_shardings(model_cfg, optimizer, mesh, teacher: bool = False,
                    shardings: ParamShardings | None = None):
  """Shardings of a TrainState for a model config (params from `shardings`, or computed). With
  LoRA: of the adapters (and an adapter-EMA teacher); base_params is left None, as the jitted
  steps see the state (the base travels beside it)."""
  if shardings is None:
    shardings = param_shardings(model_cfg, mesh)
  abstract = nn.unbox(model.abstract_params(model_cfg))
  if lora.enabled(model_cfg):
    abstract = lora.split(abstract)[1]
  return shardings_like(abstract, optimizer, mesh, teacher, shardings.trained)
