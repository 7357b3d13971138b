"""GRPO: advantages, dynamic sampling, over-length penalty and the clipped objective (value and
gradient for every aggregation) against numpy implementations written from METHOD.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import losses, rl


def test_advantages_each_scale_matches_numpy():
  rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
  mean = rewards.mean(1, keepdims=True)
  eps = 1e-6
  want = {"group": (rewards - mean) / (rewards.std(1, keepdims=True) + eps),
          "batch": (rewards - mean) / (rewards.std() + eps),
          "none": rewards - mean}
  for scale, expected in want.items():
    np.testing.assert_allclose(rl.advantages(rewards, scale, eps), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rl.group_advantages(rewards[0]), want["group"][0], rtol=1e-5)
  assert np.all(np.asarray(rl.advantages(rewards))[2] == 0)  # zero-variance group: no signal
  with pytest.raises(ValueError, match="scale"):
    rl.advantages(rewards, "global")


def test_dynamic_sampling_drops_and_counts_zero_variance_groups():
  rewards = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 1.0]], np.float32)
  keep, frac_zero_std = rl.dynamic_sampling_mask(rewards)
  np.testing.assert_array_equal(keep, [False, True, False, True])
  assert float(frac_zero_std) == pytest.approx(0.5)


def test_overlong_penalty_counts_tokens():
  lengths = np.array([10, 80, 90, 95, 100, 120])
  got = np.asarray(rl.overlong_penalty(lengths, max_len=100, buffer=20, coef=1.0))
  want = [-min(max((L - 80) / 20, 0), 1) for L in lengths]
  np.testing.assert_allclose(got, want, atol=1e-7)
  hard = np.asarray(rl.overlong_penalty(lengths, max_len=100, buffer=0, coef=0.5))
  np.testing.assert_allclose(hard, [0, 0, 0, 0, -0.5, -0.5])


def test_mask_truncated():
  mask = np.ones((3, 4), bool)
  got = rl.mask_truncated(mask, np.array([True, False, True]))
  np.testing.assert_array_equal(got, [[1] * 4, [0] * 4, [1] * 4])


def test_rewards_add_format_and_overlong_terms():
  correct = np.array([True, False, True, False])
  answered = [True, True, False, False]
  lengths = np.array([10, 100, 95, 50])
  got = rl.rewards(correct, answered, lengths, max_len=100, format_reward=0.1,
                   overlong_buffer=10, overlong_coef=1.0)
  np.testing.assert_allclose(got, [1.1, 0.1 - 1.0, 1.0 - 0.5, 0.0], atol=1e-6)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(rl.rewards(correct, answered, lengths, max_len=100),
                                correct.astype(np.float32))


def np_grpo(logp, old, adv, mask, eps_low, eps_high, beta, ref, aggregation, max_len):
  """Loss and d loss / d logp, written out case by case."""
  ratio = np.exp(logp - old)
  A = adv[:, None]
  clipped_ratio = np.clip(ratio, 1 - eps_low, 1 + eps_high)
  use_unclipped = ratio * A <= clipped_ratio * A
  per_token = -np.where(use_unclipped, ratio * A, clipped_ratio * A)
  # gradient of -rho A is -rho A; of the clipped branch it is 0 outside the range
  inside = (ratio >= 1 - eps_low) & (ratio <= 1 + eps_high)
  d_token = np.where(use_unclipped | inside, -ratio * A, 0.0)
  if beta:
    per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    d_token = d_token + beta * (1 - np.exp(ref - logp))
  if aggregation == "token_mean":
    weight = mask / mask.sum()
  elif aggregation == "seq_mean_token_mean":
    n = mask.sum(1, keepdims=True)
    active = (n > 0).sum()
    weight = np.where(n > 0, mask / np.maximum(n, 1), 0) / active
  else:
    weight = mask / (mask.shape[0] * max_len)
  return np.sum(per_token * weight), d_token * weight


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_objective_value_and_gradient(aggregation, beta):
  rng = np.random.default_rng(0)
  N, C = 6, 7
  logp = rng.uniform(-3, -0.1, (N, C))
  old = logp + rng.normal(0, 0.3, (N, C))  # ratios well outside [0.8, 1.28] too
  ref = logp + rng.normal(0, 0.5, (N, C))
  adv = rng.normal(size=N)
  mask = (rng.uniform(size=(N, C)) > 0.3).astype(np.float64)
  mask[3] = 0  # a row with no trained tokens (e.g. dropped by dynamic sampling)
  eps_low, eps_high, max_len = 0.2, 0.28, 10
  want, want_grad = np_grpo(logp, old, adv, mask, eps_low, eps_high, beta, ref, aggregation,
                            max_len)

  def f(lp):
    return losses.grpo_objective(lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                                 jnp.asarray(mask, jnp.float32), eps_low=eps_low,
                                 eps_high=eps_high, kl_beta=beta,
                                 ref_logprobs_NC=jnp.asarray(ref, jnp.float32),
                                 aggregation=aggregation, max_completion_len=max_len)

  (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  ratio = np.exp(logp - old)
  low = ((ratio < 1 - eps_low) & (adv[:, None] < 0) & (mask > 0)).sum() / mask.sum()
  high = ((ratio > 1 + eps_high) & (adv[:, None] > 0) & (mask > 0)).sum() / mask.sum()
  assert float(metrics["clip_ratio/low"]) == pytest.approx(low, abs=1e-6)
  assert float(metrics["clip_ratio/high"]) == pytest.approx(high, abs=1e-6)
  assert low > 0 and high > 0
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  assert float(metrics["kl"]) == pytest.approx((k3 * mask).sum() / mask.sum(), rel=1e-5)


def test_on_policy_ratio_one_loss_near_zero_but_gradient_not():
  """mu = 1: rho == 1, so the loss is -mean(A) (0 for centred advantages) yet the gradient is
  -A per token (what users ask about)."""
  logp = jnp.full((2, 3), -1.0)
  adv = jnp.array([1.0, -1.0])
  mask = jnp.ones((2, 3))
  value, grad = jax.value_and_grad(
      lambda lp: losses.grpo_objective(lp, logp, adv, mask)[0])(logp)
  assert abs(float(value)) < 1e-7
  np.testing.assert_allclose(grad, -adv[:, None] * jnp.ones((2, 3)) / 6, rtol=1e-6)


def test_kl_beta_without_reference_is_an_error():
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="ref_logprobs"):
    losses.grpo_objective(x, x, jnp.zeros(1), x + 1, kl_beta=0.1)
