"""Train steps: SFT gradient (packing, accumulation) against an unchunked reference, 1 device =
the (2, 2, 2) mesh, EMA / frozen teacher, non-finite skipping, optimizer schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import model, parallel
from opsd_jax.config import default_config
from opsd_jax.train import optim, state as state_lib, steps

import helpers
from helpers import sgd, single_device, to_numpy

CFG = helpers.tiny_config(56)


@pytest.fixture(scope="module")
def params():
  return helpers.init_params(CFG)


def sft_batch(seed=0, B=8, T=12):
  return helpers.sft_batch(CFG.vocab_size, seed, B, T)


def reference_sft_grad(params, batch):
  """Full logits from model.forward; sum of -log p over trained tokens / their global count."""
  def loss(p):
    logits = model.forward(CFG, p, batch["tokens"], positions_BT=batch["positions"],
                           segment_ids_BT=batch["segment_ids"])
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    return jnp.sum(nll * mask) / jnp.sum(mask)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("micro_batches,mesh_shape", [(1, None), (4, (2, 2, 2))])
def test_sft_step_gradient_equals_full_batch_reference(params, micro_batches, mesh_shape):
  batch = sft_batch()
  want_loss, want_grad = reference_sft_grad(params, batch)
  mesh = single_device() if mesh_shape is None else parallel.make_mesh(*mesh_shape)
  sft_cfg = default_config().sft
  sft_cfg.micro_batches = micro_batches
  tx = sgd(1.0)
  before = to_numpy(params)
  state = state_lib.create(params, tx, jax.random.key(0), model_cfg=CFG, mesh=mesh)
  step = steps.make_sft_step(CFG, sft_cfg, tx, mesh, chunk=4)
  state, metrics = step(state, parallel.shard_batch(batch, mesh))
  assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5)
  assert float(metrics["trained_tokens"]) == batch["loss_mask"][:, 1:].sum()
  grad = jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params)  # sgd, lr 1
  for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6)
  assert int(state.step) == 1


def rollout_batch(seed=0, N=8, P=5, Pt=7, C=6):
  return helpers.rollout_batch(CFG.vocab_size, seed, N, P, Pt, C)


# SGD, not Adam, in the mesh comparisons: Adam's first step is ~lr * sign(g), which turns float
# reduction-order noise in near-zero gradients into large parameter differences.
def run_grpo(params, mesh, batch):
  c = default_config()
  c.rlvr.kl_beta = 0.05
  tx = sgd()
  state = state_lib.create(params, tx, jax.random.key(0), model_cfg=CFG, mesh=mesh)
  score = steps.make_score_fn(CFG, mesh, temperature=0.7, chunk=4)
  batch = dict(batch)
  noise = np.random.default_rng(5).normal(0, 0.4, batch["completion_mask"].shape)
  # old != current so that both clip ranges are exercised
  batch["old_logprobs"] = np.asarray(score(state.params, parallel.shard_batch(batch, mesh))
                                     ) + noise.astype(np.float32)
  batch["ref_logprobs"] = batch["old_logprobs"] - np.float32(0.1)
  step = steps.make_grpo_step(CFG, c.rlvr, tx, mesh, temperature=0.7, chunk=4)
  state, metrics = step(state, parallel.shard_batch(batch, mesh))
  return state, metrics, step, batch


def run_opsd(params, mesh, batch):
  c = default_config()
  c.opsd.teacher, c.opsd.ema_decay = "ema", 0.9
  c.opsd.divergence, c.opsd.rollout_filter, c.opsd.clip = "fkl", "split_direction", 0.05
  tx = sgd()
  state = state_lib.create(params, tx, jax.random.key(0), teacher_params=params, model_cfg=CFG,
                           mesh=mesh)
  step = steps.make_opsd_step(CFG, c.opsd, tx, mesh, chunk=4)
  state, metrics = step(state, parallel.shard_batch(batch, mesh))
  return state, metrics


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_grpo_step_one_device_equals_mesh_and_nonfinite_is_skipped(params):
  batch = rollout_batch()
  one, m_one, step_one, scored = run_grpo(params, single_device(), batch)
  many, m_many, _, _ = run_grpo(params, parallel.make_mesh(2, 2, 2), batch)
  assert_trees_close(one.params, many.params)
  assert_trees_close(one.opt_state, many.opt_state)
  for k in m_one:
    assert float(m_one[k]) == pytest.approx(float(m_many[k]), rel=1e-4, abs=1e-6), k
  assert float(m_one["clip_ratio/low"]) + float(m_one["clip_ratio/high"]) > 0
  assert float(m_one["kl"]) > 0 and float(m_one["nonfinite"]) == 0

  before = to_numpy(one.params)
  bad = dict(scored)
  bad["advantages"] = np.full_like(bad["advantages"], np.nan)
  after, metrics = step_one(one, parallel.shard_batch(bad, single_device()))
  assert float(metrics["nonfinite"]) == 1.0 and int(after.skipped_steps) == 1
  assert int(after.step) == 2
  assert_trees_close(after.params, before, rtol=0, atol=0)


def test_opsd_step_one_device_equals_mesh_and_ema_teacher(params):
  batch = rollout_batch(1)
  start = to_numpy(params)
  one, m_one = run_opsd(params, single_device(), batch)
  many, m_many = run_opsd(params, parallel.make_mesh(2, 2, 2), batch)
  assert_trees_close(one.params, many.params)
  assert_trees_close(one.teacher_params, many.teacher_params)
  for k in m_one:
    assert float(m_one[k]) == pytest.approx(float(m_many[k]), rel=1e-4, abs=1e-6), k
  # EMA: teacher = 0.9 * initial + 0.1 * updated params
  want = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * np.asarray(p), start, one.params)
  assert_trees_close(one.teacher_params, want, rtol=1e-6, atol=1e-7)
  assert float(m_one["trained_tokens"]) == batch["completion_mask"].sum()
  assert float(m_one["opsd/selected_frac"]) == 1.0


def test_opsd_frozen_teacher_is_unchanged_and_current_needs_no_snapshot(params):
  c = default_config()
  c.opsd.rollout_filter = "all"
  tx = sgd(0.5)
  mesh = single_device()
  batch = parallel.shard_batch(rollout_batch(2), mesh)
  start = to_numpy(params)
  state = state_lib.create(params, tx, jax.random.key(0), teacher_params=params, model_cfg=CFG,
                           mesh=mesh)
  state, metrics = steps.make_opsd_step(CFG, c.opsd, tx, mesh, chunk=4)(state, batch)
  assert_trees_close(state.teacher_params, start, rtol=0, atol=0)
  assert float(metrics["grad_norm"]) > 0
  c.opsd.teacher = "current"
  with pytest.raises(ValueError, match="current"):
    steps.make_opsd_step(CFG, c.opsd, tx, mesh, chunk=4)(state, batch)


def test_schedules_follow_their_formulas():
  base = default_config().optimizer
  base.learning_rate, base.warmup_steps = 0.1, 4
  for kind in ("constant", "cosine", "linear"):
    base.schedule = kind
    sched = optim.make_schedule(base, total_steps=24)
    for t in (0, 2, 4, 10, 24):
      if t < 4:
        want = 0.1 * t / 4
      elif kind == "constant":
        want = 0.1
      elif kind == "cosine":
        want = 0.1 * 0.5 * (1 + np.cos(np.pi * (t - 4) / 20))
      else:
        want = 0.1 * (1 - (t - 4) / 20)
      assert float(sched(t)) == pytest.approx(want, abs=1e-7), (kind, t)
  assert float(optim.make_schedule(base, 24, learning_rate=0.5)(24)) == pytest.approx(0.0)
  base.name = "lion"
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.make_optimizer(base, 10)


def test_grad_clip_and_learning_rate_metric():
  c = default_config().optimizer
  c.name, c.grad_clip, c.learning_rate = "sgd", 0.5, 0.25
  tx = optim.make_optimizer(c, 10)
  params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
  grads = {"a": jnp.full(3, 2.0), "b": jnp.full(4, -2.0)}  # global norm 2 * sqrt(7)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  assert float(optim.current_learning_rate(opt_state)) == pytest.approx(0.25)
  scale = 0.25 * 0.5 / (2 * np.sqrt(7))  # clipped to norm 0.5, then -lr
  np.testing.assert_allclose(updates["a"], -2.0 * scale * np.ones(3), rtol=1e-6)
