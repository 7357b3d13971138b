"""Memory planner (opsd_jax/memory.py) against XLA's accounting of the compiled steps and against
real sharded arrays; bf16 parameters with a float32 optimizer state against a float32 run."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from opsd_jax import config, experiment, memory, model, parallel
from opsd_jax.train import optim, state as state_lib, steps

import helpers


@pytest.mark.parametrize("name, family, chips, hbm", [
    ("v5p-8", "v5p", 4, 95), ("v5p-32", "v5p", 16, 95), ("v4-8", "v4", 4, 32),
    ("v5litepod-16", "v5e", 16, 16), ("v5e-16", "v5e", 16, 16), ("v6e-8", "v6e", 8, 32)])
def test_tpu_slice_names(name, family, chips, hbm):
  s = memory.tpu_slice(name)
  assert (s.family, s.chips, s.hbm_bytes) == (family, chips, hbm * 2 ** 30)


@pytest.mark.parametrize("bad", ["v5p-7", "v5p-0", "v7-8", "tpu", "v5e16"])
def test_tpu_slice_rejects_bad_names(bad):
  with pytest.raises(ValueError, match="plan.tpu"):
    memory.tpu_slice(bad)


def test_config_validates_plan_tpu_and_master_weights():
  cfg = _small_cfg("full")
  cfg.plan.tpu = "v9-8"
  with pytest.raises(config.ConfigError, match="plan.tpu"):
    experiment.validate(cfg)
  cfg = _small_cfg("full")
  cfg.plan.tpu, cfg.mesh.data, cfg.mesh.fsdp = "v5e-16", 1, 8  # 8 of 16 chips: not the slice
  with pytest.raises(config.ConfigError, match="16"):
    experiment.validate(cfg)
  cfg.mesh.fsdp = -1
  experiment.validate(cfg)
  cfg.optimizer.master_weights = True
  with pytest.raises(config.ConfigError, match="master_weights"):
    experiment.validate(cfg)


SMALL = helpers.tiny_config(96, mlp_dim=64, tie_embeddings=False)


def _adamw(state_dtype="param", master_weights=False, lr=1e-3, grad_clip=1.0):
  return optim.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=lr, warmup_steps=0, schedule="constant", b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=grad_clip, state_dtype=state_dtype,
      master_weights=master_weights)), total_steps=10)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_state_bytes_equal_real_sharded_arrays(mesh_shape):
  """Planned per-device bytes (abstract mesh) = the bytes device 0 really holds of a state built
  on the 8 CPU devices with the same mesh."""
  opt = _adamw("float32", master_weights=True)
  cfg = SMALL.replace(param_dtype="bfloat16")
  mesh = parallel.make_mesh(*mesh_shape)
  params = parallel.init_params(cfg, jax.random.key(0), mesh)
  st = state_lib.create(params, opt, jax.random.key(1), teacher_params=params, model_cfg=cfg,
                        mesh=mesh)
  dev = jax.devices()[0]

  def held(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)

  planned = memory.state_bytes(cfg, opt, memory.abstract_mesh(mesh_shape), teacher=True)
  assert planned == {"params": held(st.params), "optimizer": held(st.opt_state),
                     "teacher": held(st.teacher_params)}


def _small_cfg(remat):
  # 10 layers: deeper than model.py's unroll limit (8), so the layer scan is a loop and XLA
  # keeps the remat policy (an unrolled scan lets CPU XLA CSE the recomputation away).
  cfg = config.default_config()
  cfg.model.update(dict(vocab_size=512, d_model=128, n_layers=10, n_heads=4, n_kv_heads=2,
                        head_dim=32, mlp_dim=384, remat=remat))
  cfg.sft.update(dict(batch_size=8, micro_batches=2, seq_len=256))
  cfg.sampling.update(dict(max_new_tokens=128, prompt_buckets=(64,)))
  cfg.opsd.update(dict(prompts_per_step=8, mini_batches=1))
  cfg.loss_chunk = 64
  return cfg


def _compiled_bytes(cfg, model_cfg, stage, mesh_shape):
  """XLA's own accounting of the compiled step, per device: arguments + outputs - donated
  (aliased) + temporaries = the step's peak live bytes as its buffer assignment plans them."""
  mesh = parallel.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
  opt = optim.make_optimizer(cfg.optimizer, 10)
  params = jax.eval_shape(functools.partial(model.init, model_cfg), jax.random.key(0))
  teacher = params if stage == "opsd" and steps.teacher_copy(cfg.opsd.teacher, False) else None
  st = jax.eval_shape(lambda p, t: state_lib.create(p, opt, jax.random.key(0), t), params,
                      teacher)
  if stage == "sft":
    step = steps.make_sft_step(model_cfg, cfg.sft, opt, mesh, chunk=cfg.loss_chunk)
    shape = (cfg.sft.batch_size, cfg.sft.seq_len)
    batch = dict(tokens=jax.ShapeDtypeStruct(shape, jnp.int32),
                 loss_mask=jax.ShapeDtypeStruct(shape, jnp.int32))
  else:
    step = steps.make_opsd_step(model_cfg, cfg.opsd, opt, mesh, chunk=cfg.loss_chunk)
    rows = cfg.opsd.prompts_per_step * cfg.opsd.rollouts_per_prompt // cfg.opsd.mini_batches
    _, _, batch = memory.stage_loss(cfg, model_cfg, "opsd", rows, max(cfg.sampling.prompt_buckets),
                                    cfg.sampling.max_new_tokens)
  ma = step.lower(st, batch).compile().memory_analysis()
  return (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)


@pytest.mark.parametrize("stage, remat, mesh_shape", [
    ("sft", "full", (1, 1, 1)), ("sft", "dots", (1, 1, 1)), ("opsd", "none", (1, 1, 1)),
    ("sft", "full", (1, 8, 1)), ("opsd", "dots", (1, 2, 2))])
def test_plan_matches_compiled_step_memory(stage, remat, mesh_shape):
  """The planner's train-step total per device is within 20 % of what XLA allocates for the real
  step, on one device and on fsdp / tensor meshes of the 8 CPU devices."""
  cfg = _small_cfg(remat)
  cfg.sft.batch_size = 16  # 8 rows per micro-batch: one per device at fsdp = 8
  model_cfg = config.to_model_config(cfg.model)
  planned = memory.plan_stage(cfg, model_cfg, stage, mesh_shape).train_peak
  measured = _compiled_bytes(cfg, model_cfg, stage, mesh_shape)
  assert planned == pytest.approx(measured, rel=0.2), (planned, measured)


def test_activations_follow_remat_and_mesh():
  """Residuals: full < dots < none; split over data-parallel devices, in proportion to rows."""
  acts = {}
  for remat in ("none", "dots", "full"):
    cfg = _small_cfg(remat)
    acts[remat] = memory.plan_stage(cfg, config.to_model_config(cfg.model), "sft",
                                    (1, 1, 1)).parts["activations"]
  assert acts["full"] < acts["dots"] < acts["none"]
  cfg = _small_cfg("full")
  mc = config.to_model_config(cfg.model)
  one = memory.plan_stage(cfg, mc, "sft", (1, 1, 1)).parts
  four = memory.plan_stage(cfg, mc, "sft", (1, 4, 1)).parts
  # norm scales are replicated, everything else is split over fsdp
  assert four["params"] == pytest.approx(one["params"] / 4, rel=0.01)
  assert four["optimizer"] == pytest.approx(one["optimizer"] / 4, rel=0.01)
  # rows per device 4 -> 1, plus FSDP's gathered weights (one layer + its gradient + the
  # unembedding, whole over fsdp); what else does not scale with rows is small here
  embed = mc.vocab_size * mc.d_model  # tied: the unembedding is the embedding
  layer = (mc.num_params() - embed - mc.d_model) // mc.n_layers
  gathered = 4 * (2 * layer + embed)  # float32
  assert four["activations"] - gathered == pytest.approx(one["activations"] / 4, rel=0.1)


def test_kv_cache_is_the_samplers_cache():
  """KV cache = 2 (k, v) x layers x slots x kv heads x length x head_dim x 2 bytes (bf16), for the
  prompt caches plus the decode slots, divided over the data-parallel devices."""
  cfg = _small_cfg("full")
  cfg.model.dtype = "bfloat16"
  cfg.sampling.update(dict(continuous_batching=True, num_slots=16))
  cfg.opsd.update(dict(prompts_per_step=8, rollouts_per_prompt=4))
  m = config.to_model_config(cfg.model)
  kv = memory.plan_stage(cfg, m, "opsd", (2, 2, 1)).parts["kv_cache"]
  per_row_slot = 2 * m.n_layers * m.n_kv_heads * m.head_dim * 2
  expected = per_row_slot * (8 * 64 + 16 * (64 + 128)) // 4
  assert kv == expected


# --------------------------------------------------------------------------------------------
# bf16 parameters, float32 optimizer state
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _grads(cfg, params, seed):
  tokens = jax.random.randint(jax.random.key(seed), (2, 12), 0, cfg.vocab_size)
  batch = dict(tokens=tokens, loss_mask=jnp.ones_like(tokens))
  return jax.grad(lambda p: steps.sft_loss_sum(cfg, p, batch, 8)[0])(params)


def _init(cfg):
  return jax.jit(functools.partial(model.init, cfg))(jax.random.key(0))


def test_float32_state_dtypes():
  cfg = SMALL.replace(param_dtype="bfloat16")
  params = _init(cfg)
  for master in (False, True):
    opt_state = _adamw("float32", master).init(params)
    floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)
              and x.ndim > 0]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert (opt_state.master is not None) == master
  plain = _adamw("param").init(params)  # the default keeps the old behaviour: bf16 moments
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(plain))


def test_master_weights_track_a_float32_run():
  """bf16 params + f32 state + f32 master = the f32 optimizer on f32 params given the same
  gradients, to f32 rounding; the bf16 params are the master rounded to bf16. Without the master
  copy, updates below half a bf16 ulp are lost (the params do not move at all)."""
  cfg = SMALL.replace(param_dtype="bfloat16")
  p16 = _init(cfg)
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)  # same values, exactly
  lr = 1e-5  # far below bf16's resolution for weights ~0.02 (ulp ~1e-4)
  mixed, plain, ref = _adamw("float32", True, lr), _adamw("float32", False, lr), \
      optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  ref = optax.chain(optax.clip_by_global_norm(1.0), ref)
  s_mixed, s_plain, s_ref = mixed.init(p16), plain.init(p16), ref.init(p32)
  q_mixed, q_plain, q_ref = p16, p16, p32

  @jax.jit
  def updates(g, s_mixed, q_mixed, s_plain, q_plain, s_ref, q_ref):
    u, s_mixed = mixed.update(g, s_mixed, q_mixed)
    q_mixed = optax.apply_updates(q_mixed, u)
    u, s_plain = plain.update(g, s_plain, q_plain)
    q_plain = optax.apply_updates(q_plain, u)
    u, s_ref = ref.update(jax.tree.map(lambda x: x.astype(jnp.float32), g), s_ref, q_ref)
    return s_mixed, q_mixed, s_plain, q_plain, s_ref, optax.apply_updates(q_ref, u)

  for i in range(5):
    g = _grads(cfg, q_mixed, i)  # bf16 gradients, as the train step gives them
    s_mixed, q_mixed, s_plain, q_plain, s_ref, q_ref = updates(g, s_mixed, q_mixed, s_plain,
                                                               q_plain, s_ref, q_ref)
  for m, r, q, p0, qp in zip(jax.tree.leaves(s_mixed.master), jax.tree.leaves(q_ref),
                             jax.tree.leaves(q_mixed), jax.tree.leaves(p16),
                             jax.tree.leaves(q_plain)):
    assert m.dtype == jnp.float32 and q.dtype == jnp.bfloat16 and qp.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(m), np.asarray(r), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(m.astype(jnp.bfloat16)))
  moved_master = sum(int(jnp.sum(m != p0.astype(jnp.float32))) for m, p0 in zip(
      jax.tree.leaves(s_mixed.master), jax.tree.leaves(p16)))
  moved_plain = sum(int(jnp.sum(q != p0)) for q, p0 in zip(jax.tree.leaves(q_plain),
                                                           jax.tree.leaves(p16)))
  assert moved_master > 0.9 * sum(x.size for x in jax.tree.leaves(p16))
  assert moved_plain < moved_master / 2  # most bf16 weights never moved without the master copy


def test_float32_state_update_matches_numpy_adamw():
  """One update of bf16 params with f32 state (no master) = numpy AdamW in float64 applied to the
  bf16 values, then rounded to bf16 (the add happens in f32: optax.apply_updates)."""
  p = {"w": jnp.asarray([0.5, -1.25, 2.0, 0.03125], jnp.bfloat16)}
  g = {"w": jnp.asarray([0.1, -0.2, 0.0, 1.5], jnp.bfloat16)}
  lr, b1, b2, eps, wd = 0.25, 0.9, 0.95, 1e-8, 0.1
  tx = _adamw("float32", False, lr=lr, grad_clip=0.0)
  u, st = tx.update(g, tx.init(p), p)
  assert u["w"].dtype == jnp.float32
  w = np.asarray(p["w"], np.float64)
  gg = np.asarray(g["w"], np.float64)
  m = (1 - b1) * gg / (1 - b1)
  v = (1 - b2) * gg ** 2 / (1 - b2)
  step = -lr * (m / (np.sqrt(v) + eps) + wd * w)
  np.testing.assert_allclose(np.asarray(u["w"]), step, rtol=1e-6)
  new = optax.apply_updates(p, u)["w"]
  assert new.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.asarray(
      (w + step).astype(np.float32)).astype(jnp.bfloat16)))


def test_train_step_with_bf16_params_and_master_weights():
  """The real SFT step with bf16 params and master weights: params stay bf16, they equal the
  master rounded, and the state's shardings (train.state) accept the wrapped optimizer."""
  cfg = SMALL.replace(param_dtype="bfloat16")
  opt = _adamw("float32", True)
  mesh = parallel.make_mesh(1, 4, 2)
  params = parallel.init_params(cfg, jax.random.key(0), mesh)
  st = state_lib.create(params, opt, jax.random.key(1), model_cfg=cfg, mesh=mesh)
  step = steps.make_sft_step(cfg, ml_collections.ConfigDict(dict(micro_batches=2)), opt, mesh,
                             chunk=8)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (8, 12), 0, cfg.vocab_size))
  st, metrics = step(st, parallel.shard_batch(dict(tokens=tokens,
                                                   loss_mask=np.ones_like(tokens)), mesh))
  assert np.isfinite(float(metrics["loss"]))
  for q, m in zip(jax.tree.leaves(st.params), jax.tree.leaves(st.opt_state.master)):
    assert q.dtype == jnp.bfloat16 and m.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q), np.asarray(m.astype(jnp.bfloat16)))


@pytest.mark.parametrize("teacher", ["frozen", "ema"])
def test_lora_state_bytes_equal_real_sharded_arrays(teacher):
  """With LoRA the plan counts base + adapters as params, optimizer state over the adapters only,
  and an OPSD teacher of nothing (frozen: the base alone) or the adapters' EMA: equal to what
  device 0 holds of a real LoRA train state on a (1, 4, 2) mesh."""
  from opsd_jax import lora
  opt = _adamw("float32", master_weights=False)
  cfg = SMALL.replace(lora_rank=4, lora_alpha=8.0,
                      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"))
  mesh_shape = (1, 4, 2)
  mesh = parallel.make_mesh(*mesh_shape)
  base = parallel.init_params(lora.base_config(cfg), jax.random.key(0), mesh)
  adapters = lora.init_adapters(cfg, jax.random.key(1), mesh)
  st = state_lib.create(adapters, opt, jax.random.key(1), model_cfg=cfg, mesh=mesh,
                        teacher_params=adapters if teacher == "ema" else None, base_params=base)
  dev = jax.devices()[0]

  def held(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)

  planned = memory.lora_state_bytes(cfg, opt, memory.abstract_mesh(mesh_shape),
                                    steps.teacher_copy(teacher, True))
  assert planned == {"params": held(st.base_params) + held(st.params),
                     "optimizer": held(st.opt_state),
                     "teacher": held(st.teacher_params) if teacher == "ema" else 0,
                     "trained": held(st.params)}
  full = memory.state_bytes(lora.base_config(cfg), opt, memory.abstract_mesh(mesh_shape))
  assert planned["optimizer"] < full["optimizer"] / 2  # rank 4 of d_model 32
