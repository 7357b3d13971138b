"""Token cross-entropy, k3, and the chunked log-probs against unchunked / numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import losses, model

import helpers

CFG = helpers.tiny_config(61)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5))
  want = -np.take_along_axis(np_log_softmax(logits / 0.7), targets[..., None], -1)[..., 0]
  got = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), temperature=0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_k3_value_and_gradient():
  p = np.array([-1.0, -0.2, -3.0, -0.7], np.float32)
  q = np.array([-1.5, -0.2, -0.1, -2.0], np.float32)
  want = np.exp(q - p) - (q - p) - 1
  np.testing.assert_allclose(losses.k3(jnp.asarray(p), jnp.asarray(q)), want, rtol=1e-6)
  assert np.all(np.asarray(losses.k3(jnp.asarray(p), jnp.asarray(q))) >= 0)
  grad_p = jax.grad(lambda p_: jnp.sum(losses.k3(p_, jnp.asarray(q))))(jnp.asarray(p))
  np.testing.assert_allclose(grad_p, 1 - np.exp(q - p), rtol=1e-5)  # d/dp of e^(q-p) - (q-p)
  # k3's gradient is zero only where p == q (unlike k1 = p - q, whose gradient is always 1).
  assert abs(float(grad_p[1])) < 1e-7


@pytest.fixture(scope="module")
def params():
  return helpers.init_params(CFG)


def _rollout(rng, N=3, P=4, C=11):
  tokens = rng.integers(0, CFG.vocab_size, (N, P + C)).astype(np.int32)
  mask = np.ones((N, P + C), np.int32)
  mask[0, :2] = 0  # left padding
  mask[1, -3:] = 0  # right padding in the completion
  return jnp.asarray(tokens), jnp.asarray(mask), P, C


def _reference_logprobs(params, tokens, mask, P, C, temperature):
  logits = model.forward(CFG, params, tokens, mask) / temperature
  logp = jax.nn.log_softmax(logits[:, P - 1:P - 1 + C], -1)
  return jnp.take_along_axis(logp, tokens[:, P:, None], -1)[..., 0], logp


def test_logprobs_chunked_equals_unchunked_values_and_gradients(params):
  tokens, mask, P, C = _rollout(np.random.default_rng(1))
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(3, C)), jnp.float32)

  def chunked(p):
    lp, ent = losses.logprobs_chunked(CFG, p, tokens, mask, P, C, 0.8, chunk=4,
                                      with_entropy=True)  # 11 = 4 + 4 + 3: a padded last chunk
    return jnp.sum(lp * weights) + jnp.sum(ent), (lp, ent)

  def reference(p):
    lp, logp = _reference_logprobs(p, tokens, mask, P, C, 0.8)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return jnp.sum(lp * weights) + jnp.sum(ent), (lp, ent)

  (v1, (lp1, ent1)), g1 = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
  (v2, (lp2, ent2)), g2 = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
  np.testing.assert_allclose(lp1, lp2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent1, ent2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_logprobs_chunked_rejects_out_of_range_start(params):
  tokens, mask, P, C = _rollout(np.random.default_rng(1))
  with pytest.raises(ValueError, match="start"):
    losses.logprobs_chunked(CFG, params, tokens, mask, 0, C, 1.0, 4)


def test_chunks_are_at_most_the_requested_length_and_pad_less_than_one_per_chunk():
  """Chunks of at most `chunk` cover L with fewer than n padded positions (384 -> 2 x 192)."""
  assert losses._chunking(384, 256) == (2, 192)
  for L in range(1, 300):
    for chunk in (1, 7, 64, 256, 1000):
      n, length = losses._chunking(L, chunk)
      assert length <= chunk and n == -(-L // min(chunk, L)) and 0 <= n * length - L < n


def test_chunk_map_never_materialises_full_logits(params):
  """The compiled gradient of the chunked log-probs needs far less temp memory than [B, T, V]."""
  cfg = CFG.replace(vocab_size=16384)  # V >> T so that logits, not attention, dominate
  p = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  tokens = jnp.zeros((2, 129), jnp.int32)

  def loss(p_, chunk):
    return jnp.sum(losses.logprobs_chunked(cfg, p_, tokens, None, 1, 128, 1.0, chunk))

  def temp_bytes(chunk):
    compiled = jax.jit(jax.grad(lambda p_: loss(p_, chunk))).lower(p).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_logits_bytes = 2 * 128 * 16384 * 4
  unchunked = temp_bytes(128)
  assert unchunked >= full_logits_bytes  # one chunk: the [B, T, V] logits exist
  assert temp_bytes(16) < min(unchunked / 4, full_logits_bytes)
