"""linear_chunk_loss (gradient taken chunk by chunk in the forward pass) against plain autodiff of
the unchunked loss, and its NLL / entropy against numpy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import losses, model
from opsd_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=48)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("tie", [True, False])
def test_nll_sum_chunked_equals_unchunked_values_and_gradients(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  params = jax.jit(lambda key: model.init(cfg, key))(jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 13)).astype(np.int32))
  weights = jnp.asarray(rng.uniform(-1.0, 2.0, (3, 12)).astype(np.float32))  # any linear weights

  def fused(p):  # chunk 5 does not divide 12: the padded tail must not count
    h = model.hidden_states(cfg, p, tokens)[:, :-1]
    total, ent = losses.nll_sum_chunked(cfg, p, h, tokens[:, 1:], weights, chunk=5)
    return total, ent

  def plain(p):
    logp = jax.nn.log_softmax(model.forward(cfg, p, tokens)[:, :-1], -1)
    return -jnp.sum(weights * jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0])

  (total, ent), grads = jax.jit(jax.value_and_grad(fused, has_aux=True))(params)
  want_total, want_grads = jax.jit(jax.value_and_grad(plain))(params)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)

  logp = np_log_softmax(np.asarray(jax.jit(lambda p: model.forward(cfg, p, tokens))(params), np.float64)[:, :-1])
  np.testing.assert_allclose(ent, -(np.exp(logp) * logp).sum(-1), rtol=1e-5)
  nll = -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(total, (np.asarray(weights) * nll).sum(), rtol=1e-5)


def test_linear_chunk_loss_scales_with_cotangent_and_gives_no_gradient_to_consts():
  rng = np.random.default_rng(1)
  head = {"w": jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32))}
  h = jnp.asarray(rng.normal(size=(2, 7, 4)).astype(np.float32))
  other = jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32))
  coef = jnp.asarray(rng.uniform(size=(2, 7)).astype(np.float32))

  def per_chunk(head_, h_c, _, other_):
    s = jax.nn.log_softmax(h_c @ head_["w"], -1)
    t = jax.nn.log_softmax(h_c @ other_, -1)
    return jnp.sum(jnp.exp(s) * (s - t), -1), jnp.sum(s, -1)

  def fused(head_, h_, other_):
    return 3.0 * losses.linear_chunk_loss(per_chunk, head_, h_, None, other_, coef, 3)[0]

  def plain(head_, h_, other_):
    other_ = jax.lax.stop_gradient(other_)
    return 3.0 * jnp.sum(coef * per_chunk(head_, h_, None, other_)[0])

  got = jax.grad(fused, argnums=(0, 1, 2))(head, h, other)
  want = jax.grad(plain, argnums=(0, 1, 2))(head, h, other)
  np.testing.assert_allclose(fused(head, h, other), plain(head, h, other), rtol=1e-5)
  np.testing.assert_allclose(got[0]["w"], want[0]["w"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(got[2]))
