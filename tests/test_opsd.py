"""OPSD divergences against numpy formulas; clip, top-k, the sampled estimator (Monte Carlo), the
identity, teacher gradient, rollout filters and chunked = unchunked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import losses, model

import helpers

CFG = helpers.tiny_config(53)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(logp, logq):  # KL(p || q) over the last axis
  return np.sum(np.exp(logp) * (logp - logq), -1)


def logits_pair(seed=0, shape=(2, 3, 11)):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape).astype(np.float32) * 2,
          rng.normal(size=shape).astype(np.float32) * 2)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                       ("jsd", 0.0), ("jsd", 1.0)])
def test_token_divergence_matches_numpy(kind, beta):
  s_logits, t_logits = logits_pair()
  temperature = 1.3
  s = np_log_softmax(s_logits.astype(np.float64) / temperature)
  t = np_log_softmax(t_logits.astype(np.float64) / temperature)
  if kind == "fkl" or (kind == "jsd" and beta == 0.0):
    want = np_kl(t, s)
  elif kind == "rkl" or (kind == "jsd" and beta == 1.0):
    want = np_kl(s, t)
  else:
    log_m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
    want = beta * np_kl(t, log_m) + (1 - beta) * np_kl(s, log_m)
  got = losses.token_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), kind, beta,
                                temperature=temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pointwise_clip_value_negative_and_zero_gradient_on_clipped_entries():
  s_logits, t_logits = logits_pair(1)
  tau = 0.05
  s, t = np_log_softmax(s_logits.astype(np.float64)), np_log_softmax(t_logits.astype(np.float64))
  summands = np.exp(t) * (t - s)  # fkl summands, some negative
  clipped = summands > tau
  want = np.where(clipped, tau, summands).sum(-1)
  got = losses.token_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), "fkl", clip=tau)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert want.min() < 0 and float(jnp.min(got)) < 0  # the clipped loss can go negative

  # Gradient w.r.t. student logits z: only unclipped summands -p_T,v s_v(z) contribute:
  # d/dz_j = -p_T,j [j unclipped] + p_S,j * sum_{v unclipped} p_T,v.
  pt, ps, kept = np.exp(t), np.exp(s), ~clipped
  want_grad = -pt * kept + ps * np.sum(pt * kept, -1, keepdims=True)
  grad = jax.grad(lambda z: jnp.sum(losses.token_divergence(z, jnp.asarray(t_logits), "fkl",
                                                            clip=tau)))(jnp.asarray(s_logits))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_topk_divergence_renormalises_over_teacher_topk():
  s_logits, t_logits = logits_pair(2)
  k = 4
  ids = np.argsort(-t_logits, -1)[..., :k]
  s = np_log_softmax(np.take_along_axis(s_logits, ids, -1).astype(np.float64) / 0.9)
  t = np_log_softmax(np.take_along_axis(t_logits, ids, -1).astype(np.float64) / 0.9)
  for kind, want in (("fkl", np_kl(t, s)), ("rkl", np_kl(s, t))):
    got = losses.topk_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), k, kind,
                                 temperature=0.9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # k = V is the full divergence
  full = losses.token_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), "rkl")
  np.testing.assert_allclose(losses.topk_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits),
                                                    11, "rkl"), full, rtol=1e-5, atol=1e-6)


def test_sampled_estimator_expected_gradient_is_reverse_kl_gradient():
  rng = np.random.default_rng(3)
  V, S = 6, 200_000
  z = rng.normal(size=V).astype(np.float32)
  t_logits = rng.normal(size=V).astype(np.float32)
  ps = np.exp(np_log_softmax(z.astype(np.float64)))
  samples = rng.choice(V, size=S, p=ps / ps.sum())

  def mc_loss(z_):
    s_BTV = jnp.broadcast_to(z_, (1, S, V))
    t_BTV = jnp.broadcast_to(jnp.asarray(t_logits), (1, S, V))
    loss, _ = losses.sampled_divergence(s_BTV, t_BTV, jnp.asarray(samples)[None])
    return jnp.mean(loss)

  grad_mc = np.asarray(jax.jit(jax.grad(mc_loss))(jnp.asarray(z)))
  s, t = np_log_softmax(z.astype(np.float64)), np_log_softmax(t_logits.astype(np.float64))
  kl = np_kl(s, t)
  analytic = ps * ((s - t) - kl)  # d KL(p_S || p_T) / d z
  np.testing.assert_allclose(grad_mc, analytic, atol=0.01)
  assert np.abs(analytic).max() > 0.05  # the comparison is not vacuous


@pytest.fixture(scope="module")
def params():
  return helpers.init_params(CFG, 0), helpers.init_params(CFG, 1)


def make_batch(seed=0, N=4, P=5, Pt=8, C=9):
  rng = np.random.default_rng(seed)
  completion = rng.integers(0, CFG.vocab_size, (N, C))
  tokens = np.concatenate([rng.integers(0, CFG.vocab_size, (N, P)), completion], 1)
  teacher_tokens = np.concatenate([rng.integers(0, CFG.vocab_size, (N, Pt)), completion], 1)
  mask = np.ones_like(tokens)
  mask[0, :2] = 0
  teacher_mask = np.ones_like(teacher_tokens)
  teacher_mask[1, :3] = 0
  completion_mask = np.ones((N, C), np.float32)
  completion_mask[2, 6:] = 0
  mask[2, P + 6:] = 0
  teacher_mask[2, Pt + 6:] = 0
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens.astype(np.int32), mask=mask.astype(np.int32),
      teacher_tokens=teacher_tokens.astype(np.int32), teacher_mask=teacher_mask.astype(np.int32),
      completion_mask=completion_mask, correct=np.array([True, False, True, False])).items()}


def reference_opsd_loss(params, teacher_params, batch, *, divergence, clip, temperature,
                        estimator, topk, reduction, rollout_filter):
  """Unchunked: full [N, T, V] logits from model.forward, then the per-token formulas."""
  C = batch["completion_mask"].shape[1]
  P, Pt = batch["tokens"].shape[1] - C, batch["teacher_tokens"].shape[1] - C
  s = model.forward(CFG, params, batch["tokens"], batch["mask"])[:, P - 1:P - 1 + C]
  t = model.forward(CFG, jax.lax.stop_gradient(teacher_params), batch["teacher_tokens"],
                    batch["teacher_mask"])[:, Pt - 1:Pt - 1 + C]
  if estimator == "sampled":
    per_token, _ = losses.sampled_divergence(s, t, batch["tokens"][:, P:], temperature)
  elif estimator == "topk":
    per_token = losses.topk_divergence(s, t, topk, divergence, clip=clip, temperature=temperature)
  elif rollout_filter == "split_direction":
    rkl = losses.token_divergence(s, t, "rkl", clip=clip, temperature=temperature)
    fkl = losses.token_divergence(s, t, "fkl", clip=clip, temperature=temperature)
    per_token = jnp.where(batch["correct"][:, None], rkl, fkl)
  else:
    per_token = losses.token_divergence(s, t, divergence, clip=clip, temperature=temperature)
  sel = {"all": np.ones(4), "split_direction": np.ones(4), "correct_only": np.array([1, 0, 1, 0]),
         "incorrect_only": np.array([0, 1, 0, 1])}[rollout_filter]
  w = batch["completion_mask"] * jnp.asarray(sel, jnp.float32)[:, None]
  if reduction == "token":
    return jnp.sum(per_token * w) / jnp.sum(w)
  per_seq = jnp.sum(per_token * w, 1) / jnp.maximum(jnp.sum(w, 1), 1)
  return jnp.sum(per_seq) / jnp.sum(jnp.sum(w, 1) > 0)


@pytest.mark.parametrize("options", [
    dict(divergence="rkl", clip=None, temperature=1.0, estimator="full", topk=0,
         reduction="token", rollout_filter="correct_only"),
    dict(divergence="fkl", clip=0.05, temperature=1.1, estimator="full", topk=0,
         reduction="sequence", rollout_filter="split_direction"),
    dict(divergence="jsd", clip=None, temperature=1.0, estimator="topk", topk=5,
         reduction="sequence", rollout_filter="incorrect_only"),
    dict(divergence="rkl", clip=None, temperature=0.7, estimator="sampled", topk=0,
         reduction="token", rollout_filter="all"),
])
def test_opsd_chunked_equals_unchunked(params, options):
  student, teacher = params
  batch = make_batch()
  kw = dict(options)

  def chunked(p, t):
    return losses.opsd_loss_chunked(CFG, p, t, batch, chunk=4, jsd_beta=0.5, **kw)[0]

  def reference(p):
    return reference_opsd_loss(p, teacher, batch, **kw)

  v1, (g1, g_teacher) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(student, teacher)
  v2, g2 = jax.jit(jax.value_and_grad(reference))(student)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_teacher))  # teacher frozen
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence,estimator", [("rkl", "full"), ("jsd", "topk")])
def test_identity_loss_zero_grad_zero_and_teacher_gets_no_gradient(params, divergence, estimator):
  student, _ = params
  batch = dict(make_batch(1))
  batch["teacher_tokens"], batch["teacher_mask"] = batch["tokens"], batch["mask"]

  def loss(p, t):
    return losses.opsd_loss_chunked(CFG, p, t, batch, divergence=divergence, estimator=estimator,
                                    topk=5, rollout_filter="all", chunk=4)[0]

  value, (g_student, g_teacher) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(student,
                                                                                     student)
  assert abs(float(value)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_student)) < 1e-6
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_teacher))


def test_empty_selection_is_a_counted_noop(params):
  student, teacher = params
  batch = dict(make_batch(3))
  batch["correct"] = jnp.zeros(4, bool)

  def loss(p):
    return losses.opsd_loss_chunked(CFG, p, teacher, batch, rollout_filter="correct_only",
                                    chunk=4)

  (value, metrics), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(student)
  assert float(value) == 0.0
  assert float(metrics["opsd/empty_selection"]) == 1.0
  assert float(metrics["trained_tokens"]) == 0.0 and float(metrics["opsd/selected_frac"]) == 0.0
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g))


def test_bad_options_get_clear_errors(params):
  student, teacher = params
  with pytest.raises(ValueError, match="opsd.divergence"):
    losses.opsd_loss_chunked(CFG, student, teacher, make_batch(), divergence="kl")
  with pytest.raises(ValueError, match="sampled"):
    losses.opsd_loss_chunked(CFG, student, teacher, make_batch(), divergence="fkl",
                             estimator="sampled")
