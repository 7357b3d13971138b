"""Pure losses (float32): token cross-entropy, the GRPO objective, OPSD divergences, and their
chunked-over-time forms that never hold [B, T, V] logits.

Batch conventions (what the stage loops build):
- SFT: {tokens [B, T] int32, loss_mask [B, T] (1 where token t is a trained target, predicted from
  the logits at t-1; loss_mask[:, 0] is ignored), segment_ids [B, T] (0 = padding; packed documents
  attend only within their segment), positions [B, T]}.
- Rollouts (GRPO, OPSD student side): prompts left-padded to P, completions right-padded to C:
  {tokens [N, P+C] int32, mask [N, P+C] (real tokens), completion_mask [N, C] (trained completion
  tokens)}. Completion token c sits at index P+c; its log-prob comes from the logits at P+c-1.
  Positions = model.positions_from_mask(mask). P is read off the shapes: P = T - C.
  GRPO adds old_logprobs [N, C], advantages [N] and (kl_beta > 0) ref_logprobs [N, C].
  OPSD adds teacher_tokens / teacher_mask [N, Pt+C] (teacher prompt left-padded to Pt, the SAME
  completion tokens appended) and correct [N] bool (for the rollout filter).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from opsd_jax import model

DIVERGENCES = ("fkl", "rkl", "jsd")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")
ESTIMATORS = ("full", "topk", "sampled")
REDUCTIONS = ("token", "sequence")
# Rollout filter -> the rows it trains on, from correct [N] bool. Written with operators numpy and
# jnp arrays share, so the stage loop (numpy, to skip empty mini-batches) and the loss (jnp) use
# this one definition. split_direction trains every row (rkl on correct, fkl on incorrect ones:
# opsd_loss_chunked); a filter added here needs nothing else unless it changes the divergence.
_ROLLOUT_FILTERS = {
    "all": lambda correct: correct | ~correct,
    "correct_only": lambda correct: correct,
    "incorrect_only": lambda correct: ~correct,
    "split_direction": lambda correct: correct | ~correct,
}
ROLLOUT_FILTERS = tuple(_ROLLOUT_FILTERS)


def _log_softmax(logits, temperature=1.0):
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _gather(logp_BTV, ids_BT):
  return jnp.take_along_axis(logp_BTV, ids_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_cross_entropy(logits_BTV, targets_BT, temperature: float = 1.0):
  """-log p(target) per position [B, T] (float32)."""
  return -_gather(_log_softmax(logits_BTV, temperature), targets_BT)


def entropy(logits_BTV, temperature: float = 1.0):
  logp = _log_softmax(logits_BTV, temperature)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def k3(p_logp, q_logp):
  """k3 estimator of KL(p || q) from samples of p: exp(q - p) - (q - p) - 1 >= 0. Unlike the plain
  log-ratio (k1) its gradient as a loss term is not zero in expectation."""
  d = q_logp - p_logp
  return jnp.exp(d) - d - 1.0


def masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# --------------------------------------------------------------------------------------------
# Divergences per token
# --------------------------------------------------------------------------------------------


def _summands(s_logp, t_logp, kind, beta):
  """Per-(n, v) summands of the divergence over the last axis, from normalised log-probs."""
  if kind == "jsd" and beta == 0.0:
    kind = "fkl"  # jsd(0) is degenerate (m = p_S); the GKD convention maps it to forward KL
  elif kind == "jsd" and beta == 1.0:
    kind = "rkl"
  if kind == "fkl":
    return jnp.exp(t_logp) * (t_logp - s_logp)
  if kind == "rkl":
    return jnp.exp(s_logp) * (s_logp - t_logp)
  if kind == "jsd":
    log_m = jnp.logaddexp(math.log(beta) + t_logp, math.log1p(-beta) + s_logp)
    return (beta * jnp.exp(t_logp) * (t_logp - log_m)
            + (1.0 - beta) * jnp.exp(s_logp) * (s_logp - log_m))
  raise ValueError(f"divergence kind must be one of {DIVERGENCES}, got {kind!r}")


def _sum_clipped(summands, clip):
  if clip is None:
    return jnp.sum(summands, axis=-1)
  # where, not minimum: a clipped entry gets exactly zero gradient (minimum splits ties).
  return jnp.sum(jnp.where(summands > clip, clip, summands), axis=-1)


def token_divergence(student_logits_BTV, teacher_logits_BTV, kind: str = "fkl", beta: float = 0.5,
                     clip: float | None = None, temperature: float = 1.0):
  """Divergence per position [B, T] over the full vocabulary (METHOD.md stage 3).

  fkl = KL(p_T || p_S), rkl = KL(p_S || p_T), jsd(beta) = beta KL(p_T||m) + (1-beta) KL(p_S||m)
  with m = beta p_T + (1-beta) p_S built in log space; beta 0 / 1 mean fkl / rkl. `clip` (tau)
  caps every summand before the sum over v, so the result can be negative. Both logits are
  divided by `temperature`. Gradients flow into both arguments; callers stop the teacher's.
  """
  s = _log_softmax(student_logits_BTV, temperature)
  t = _log_softmax(teacher_logits_BTV, temperature)
  return _sum_clipped(_summands(s, t, kind, beta), clip)


def topk_divergence(student_logits_BTV, teacher_logits_BTV, k: int, kind: str = "fkl",
                    beta: float = 0.5, clip: float | None = None, temperature: float = 1.0):
  """token_divergence restricted to the teacher's top-k ids, each side renormalised over them."""
  if k < 1:
    raise ValueError(f"topk_divergence: k must be >= 1, got {k}")
  teacher = teacher_logits_BTV.astype(jnp.float32) / temperature
  student = student_logits_BTV.astype(jnp.float32) / temperature
  _, ids = jax.lax.top_k(jax.lax.stop_gradient(teacher), k)
  t = jax.nn.log_softmax(jnp.take_along_axis(teacher, ids, axis=-1), axis=-1)
  s = jax.nn.log_softmax(jnp.take_along_axis(student, ids, axis=-1), axis=-1)
  return _sum_clipped(_summands(s, t, kind, beta), clip)


def sampled_divergence(student_logits_BTV, teacher_logits_BTV, tokens_BT, temperature: float = 1.0):
  """Single-sample reverse KL at the student's own sampled tokens.

  Returns (loss_BT, estimate_BT): loss = -A log p_S(y) with A = stopgrad(log p_T(y) - log p_S(y));
  its expected gradient over y ~ p_S is the gradient of KL(p_S || p_T). estimate = -A, the
  single-sample KL value (the loss value itself is not a divergence).
  """
  s_lp = _gather(_log_softmax(student_logits_BTV, temperature), tokens_BT)
  t_lp = _gather(_log_softmax(teacher_logits_BTV, temperature), tokens_BT)
  advantage = jax.lax.stop_gradient(t_lp - s_lp)
  return -advantage * s_lp, -advantage


# --------------------------------------------------------------------------------------------
# Chunking over time
# --------------------------------------------------------------------------------------------


def chunk_map(fn, xs, chunk: int):
  """Applies fn to slices [B, chunk, ...] of every array in xs (all [B, L, ...]) inside a
  lax.scan whose body is rematerialised: the forward keeps only fn's small outputs, and the
  backward recomputes one chunk at a time, so fn's [B, chunk, V] temporaries never exist for
  more than one chunk. Returns fn's outputs (pytree of [B, chunk, ...]) joined back to [B, L, ...].
  """
  leaves = jax.tree.leaves(xs)
  L = leaves[0].shape[1]
  n, chunk = _chunking(L, chunk)
  pad = n * chunk - L

  def split(x):
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def join(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], n * chunk, *y.shape[3:])[:, :L]

  body = jax.checkpoint(lambda carry, x: (carry, fn(x)), prevent_cse=False)
  _, ys = jax.lax.scan(body, None, jax.tree.map(split, xs))
  return jax.tree.map(join, ys)


def head_params(cfg, params):
  """The parameters `model.unembed` reads (tied embedding or lm_head), a sub-tree of params."""
  return {k: params[k] for k in (("embed",) if cfg.tie_embeddings else ("lm_head",))}


def _chunking(L, chunk):
  """(number of chunks, chunk length) covering L positions with chunks of at most `chunk`, as
  even as possible: 384 positions in chunks of at most 256 run as 2 x 192, not 2 x 256 with a
  third of the second chunk padding (unembedded and divided over V like real positions)."""
  n = -(-L // max(1, min(chunk, L)))
  return n, -(-L // n)


def _split_chunks(x, chunk, n):
  pad = n * chunk - x.shape[1]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)


def _join_chunks(y, L):
  y = jnp.moveaxis(y, 0, 1)
  return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :L]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def linear_chunk_loss(fn, head, h_BLD, xs, consts, coef_BL, chunk):
  """sum(coef_BL * loss_BL), where (loss, aux) = fn(head, h_c, xs_c, consts) per time chunk.

  For losses LINEAR in the per-token values (SFT cross-entropy, OPSD divergences; coef holds the
  reduction's weights), so the gradient of each chunk is known in the forward pass: it is taken
  there, chunk by chunk (one [B, chunk, V] at a time), and the backward only scales it. Versus a
  rematerialised scan this skips re-running the unembedding and the elementwise work over V.
  Gradients flow into `head` and `h_BLD` only; xs (chunked like h) and consts get none.
  Returns (total, aux joined to [B, L, ...]).
  """
  return _linear_chunk_loss_fwd(fn, head, h_BLD, xs, consts, coef_BL, chunk, with_grad=False)[0]


def _linear_chunk_loss_fwd(fn, head, h_BLD, xs, consts, coef_BL, chunk, with_grad=True):
  L = h_BLD.shape[1]
  n, chunk = _chunking(L, chunk)
  chunked = jax.tree.map(lambda x: _split_chunks(x, chunk, n), (h_BLD, xs, coef_BL))

  def body(carry, x):
    total, d_head = carry
    h_c, xs_c, coef_c = x
    if not with_grad:
      loss_c, aux_c = fn(head, h_c, xs_c, consts)
      return (total + jnp.sum(loss_c * coef_c), d_head), (aux_c,)
    (loss_c, vjp, aux_c) = jax.vjp(lambda hp, h: fn(hp, h, xs_c, consts), head, h_c, has_aux=True)
    d_head_c, d_h_c = vjp(coef_c.astype(loss_c.dtype))
    return (total + jnp.sum(loss_c * coef_c), jax.tree.map(jnp.add, d_head, d_head_c)), (aux_c,
                                                                                        d_h_c)

  d_head0 = jax.tree.map(jnp.zeros_like, head) if with_grad else None
  (total, d_head), ys = jax.lax.scan(body, (jnp.float32(0), d_head0), chunked)
  aux = jax.tree.map(lambda y: _join_chunks(y, L), ys[0])
  if not with_grad:
    return (total, aux), None
  d_h = _join_chunks(ys[1], L).astype(h_BLD.dtype)
  return (total, aux), (d_head, d_h)


def _linear_chunk_loss_bwd(fn, chunk, grads, cotangents):
  d_head, d_h = grads
  g = cotangents[0]  # aux are metrics: their cotangents are ignored
  return (jax.tree.map(lambda x: (g * x).astype(x.dtype), d_head), (g * d_h).astype(d_h.dtype),
          None, None, None)


linear_chunk_loss.defvjp(
    lambda fn, head, h, xs, consts, coef, chunk: _linear_chunk_loss_fwd(fn, head, h, xs, consts,
                                                                       coef, chunk),
    _linear_chunk_loss_bwd)


def _nll_and_entropy(logits_BTV, targets_BT):
  """(-log softmax(logits)[target], entropy) per position, with one exp over V for both:
  H = lse - sum(p * logits)."""
  logits = logits_BTV.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - top)
  total = jnp.sum(e, axis=-1)
  lse = top[..., 0] + jnp.log(total)
  nll = lse - _gather(logits, targets_BT)
  ent = lse - jnp.sum(e * logits, axis=-1) / total
  return nll, jax.lax.stop_gradient(ent)


def nll_sum_chunked(cfg, params, h_BLD, targets_BL, weights_BL, chunk: int = 256):
  """(sum of weights * -log p(targets), entropy per position [B, L]) from hidden states, the
  logits built one time chunk at a time (linear_chunk_loss: the gradient is taken chunk by chunk
  in the forward pass, no rematerialised unembedding)."""
  def per_chunk(head, h_c, targets_c, _):
    return _nll_and_entropy(model.unembed(cfg, head, h_c), targets_c)

  return linear_chunk_loss(per_chunk, head_params(cfg, params), h_BLD, targets_BL, None,
                           weights_BL, chunk)


def logprobs_chunked(cfg, params, tokens, mask, start: int, length: int, temperature: float = 1.0,
                     chunk: int = 256, *, positions=None, segment_ids=None,
                     with_entropy: bool = False):
  """log p(tokens[:, start + c]) for c < length, from the logits at start + c - 1 (divided by
  temperature), computed chunk by chunk from model.hidden_states + model.unembed.

  Returns logprobs [B, length] (and the entropy of the same distributions with with_entropy).
  For rollouts: start = P, length = C. For SFT: start = 1, length = T - 1.
  """
  if not 1 <= start <= tokens.shape[1] - length:
    raise ValueError(f"logprobs_chunked: need 1 <= start ({start}) and start + length "
                     f"({start + length}) <= T ({tokens.shape[1]})")
  h = model.hidden_states(cfg, params, tokens, mask, positions, segment_ids)
  h = h[:, start - 1:start - 1 + length]
  targets = tokens[:, start:start + length]

  def per_chunk(x):
    h_c, targets_c = x
    logp = _log_softmax(model.unembed(cfg, params, h_c), temperature)
    out = (_gather(logp, targets_c),)
    if with_entropy:
      out += (-jnp.sum(jnp.exp(logp) * logp, axis=-1),)
    return out

  out = chunk_map(per_chunk, (h, targets), chunk)
  return out if with_entropy else out[0]


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def aggregate(per_token_NC, mask_NC, aggregation: str = "token_mean",
              max_completion_len: int | None = None):
  """Loss reduction over a (global) batch.

  token_mean: sum / number of trained tokens (DAPO). seq_mean_token_mean: each sequence's token
  mean, then the mean over sequences that have trained tokens (original GRPO). constant:
  sum / (N x max_completion_len) (Dr. GRPO), max_completion_len defaulting to C; N counts every
  row, so rows masked out (e.g. by dynamic sampling) still count in the constant.
  """
  mask = mask_NC.astype(jnp.float32)
  total = jnp.sum(per_token_NC * mask)
  if aggregation == "token_mean":
    return total / jnp.maximum(jnp.sum(mask), 1.0)
  if aggregation == "seq_mean_token_mean":
    count_N = jnp.sum(mask, axis=-1)
    seq_mean_N = jnp.sum(per_token_NC * mask, axis=-1) / jnp.maximum(count_N, 1.0)
    active_N = (count_N > 0).astype(jnp.float32)
    return jnp.sum(seq_mean_N * active_N) / jnp.maximum(jnp.sum(active_N), 1.0)
  if aggregation == "constant":
    N, C = mask.shape
    return total / (N * (C if max_completion_len is None else max_completion_len))
  raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def grpo_objective(logprobs_NC, old_logprobs_NC, advantages_N, completion_mask_NC, *,
                   eps_low: float = 0.2, eps_high: float = 0.2, kl_beta: float = 0.0,
                   ref_logprobs_NC=None, aggregation: str = "token_mean",
                   max_completion_len: int | None = None):
  """Clipped-ratio GRPO loss (to minimise) and its metrics.

  Per token: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_beta k3(log pi, log pi_ref),
  rho = exp(log pi - log pi_old). `logprobs_NC` must come from learner logits divided by the
  sampling temperature (logprobs_chunked's temperature). With one update per rollout batch
  (mu = 1) rho == 1, so the loss VALUE is about -mean(A) ~ 0 while its gradient is not zero.
  """
  mask = completion_mask_NC.astype(jnp.float32)
  ratio = jnp.exp(logprobs_NC - old_logprobs_NC)
  adv = jnp.asarray(advantages_N, jnp.float32)[:, None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  per_token = -jnp.minimum(unclipped, clipped)
  metrics = {
      "clip_ratio/low": masked_mean(((ratio < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32), mask),
      "clip_ratio/high": masked_mean(((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32),
                                     mask),
      "ratio/mean": masked_mean(ratio, mask),
      "trained_tokens": jnp.sum(mask),
  }
  if ref_logprobs_NC is not None:
    kl = k3(logprobs_NC, ref_logprobs_NC)
    metrics["kl"] = masked_mean(kl, mask)
    if kl_beta:
      per_token = per_token + kl_beta * kl
  elif kl_beta:
    raise ValueError("grpo_objective: kl_beta > 0 needs ref_logprobs_NC")
  metrics["clip_ratio"] = metrics["clip_ratio/low"] + metrics["clip_ratio/high"]
  return aggregate(per_token, mask, aggregation, max_completion_len), metrics


# --------------------------------------------------------------------------------------------
# OPSD
# --------------------------------------------------------------------------------------------


def rollout_selection(rollout_filter: str, correct_N):
  """The rows a rollout filter trains on: bool [N], a numpy array for a numpy `correct_N`, jnp for
  jnp (or a tracer)."""
  if rollout_filter not in _ROLLOUT_FILTERS:
    raise ValueError(f"rollout_filter must be one of {ROLLOUT_FILTERS}, got {rollout_filter!r}")
  return _ROLLOUT_FILTERS[rollout_filter](correct_N.astype(bool))


def _row_selection(rollout_filter, correct_N, N):
  """rollout_selection as float32 weights; without batch['correct'] only filters that keep
  every row work (all, as a batch without grades has)."""
  if correct_N is None:
    if rollout_filter != "all":
      raise ValueError(f"rollout_filter {rollout_filter!r} needs batch['correct']")
    correct_N = jnp.ones((N,), bool)
  return rollout_selection(rollout_filter, jnp.asarray(correct_N)).astype(jnp.float32)


def check_opsd_options(divergence, estimator, reduction, rollout_filter):
  if divergence not in DIVERGENCES:
    raise ValueError(f"opsd.divergence must be one of {DIVERGENCES}, got {divergence!r}")
  if estimator not in ESTIMATORS:
    raise ValueError(f"opsd.estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"opsd.reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if rollout_filter not in ROLLOUT_FILTERS:
    raise ValueError(f"opsd.rollout_filter must be one of {ROLLOUT_FILTERS}, got "
                     f"{rollout_filter!r}")
  if estimator == "sampled" and (divergence != "rkl" or rollout_filter == "split_direction"):
    raise ValueError("opsd.estimator='sampled' is the single-sample reverse KL: it needs "
                     "opsd.divergence='rkl' and a rollout_filter other than split_direction")


def opsd_loss_chunked(cfg, params, teacher_params, batch, *, divergence: str = "rkl",
                      jsd_beta: float = 0.5, clip: float | None = None, temperature: float = 1.0,
                      estimator: str = "full", topk: int = 64, reduction: str = "token",
                      rollout_filter: str = "all", chunk: int = 256):
  """OPSD loss over a rollout batch (see the module doc for the keys) and its metrics.

  Student = `params` on (tokens, mask); teacher = `teacher_params` on (teacher_tokens,
  teacher_mask), entirely under stop_gradient. Both score the same C completion tokens; the
  student and teacher logits exist one chunk ([N, chunk, V]) at a time. rollout_filter picks the
  rows trained on (split_direction: rkl on correct rows, fkl on incorrect ones); an empty
  selection gives loss 0 and zero gradient, flagged by opsd/empty_selection.
  """
  check_opsd_options(divergence, estimator, reduction, rollout_filter)
  tokens, completion_mask = batch["tokens"], batch["completion_mask"]
  teacher_tokens = batch["teacher_tokens"]
  N, C = completion_mask.shape
  P, Pt = tokens.shape[1] - C, teacher_tokens.shape[1] - C
  if P < 1 or Pt < 1:
    raise ValueError(f"opsd: student and teacher prompts must be non-empty (P={P}, Pt={Pt})")
  correct = batch.get("correct")
  h_S = model.hidden_states(cfg, params, tokens, batch["mask"])[:, P - 1:P - 1 + C]
  teacher_params = jax.lax.stop_gradient(teacher_params)
  # The teacher runs forward only: its hidden states here, its logits once per chunk inside
  # linear_chunk_loss (never recomputed for the backward).
  h_T = model.hidden_states(cfg, teacher_params, teacher_tokens, batch["teacher_mask"])
  h_T = jax.lax.stop_gradient(h_T[:, Pt - 1:Pt - 1 + C])
  targets = tokens[:, P:]
  if rollout_filter == "split_direction":
    reverse_N = jnp.asarray(correct).astype(bool)
  else:
    reverse_N = jnp.zeros((N,), bool)
  kind = divergence

  def divergence_of(s_logits, t_logits, kind_):
    if estimator == "topk":
      return topk_divergence(s_logits, t_logits, topk, kind_, jsd_beta, clip, temperature)
    return token_divergence(s_logits, t_logits, kind_, jsd_beta, clip, temperature)

  def per_chunk(head, h_s, x, teacher_head):
    h_t, targets_c, reverse_c = x
    s_logits = model.unembed(cfg, head, h_s)
    t_logits = jax.lax.stop_gradient(model.unembed(cfg, teacher_head, h_t))
    ent = jax.lax.stop_gradient(entropy(s_logits))
    if estimator == "sampled":
      loss, est = sampled_divergence(s_logits, t_logits, targets_c, temperature)
      return loss, (jax.lax.stop_gradient(est), ent)
    if rollout_filter == "split_direction":
      div = jnp.where(reverse_c, divergence_of(s_logits, t_logits, "rkl"),
                      divergence_of(s_logits, t_logits, "fkl"))
    else:
      div = divergence_of(s_logits, t_logits, kind)
    return div, (jax.lax.stop_gradient(div), ent)

  selected_N = _row_selection(rollout_filter, correct, N)
  weight_NC = completion_mask.astype(jnp.float32) * selected_N[:, None]
  trained = jnp.sum(weight_NC)

  def reduce(loss_NC):
    if reduction == "token":
      return jnp.sum(loss_NC * weight_NC) / jnp.maximum(trained, 1.0)
    return aggregate(loss_NC, weight_NC, "seq_mean_token_mean")

  # Both reductions are linear in the per-token loss: their weights are its gradient.
  coef_NC = jax.grad(reduce)(jnp.zeros((N, C), jnp.float32))
  reverse_NC = jnp.broadcast_to(reverse_N[:, None], (N, C))
  loss, (estimate_NC, entropy_NC) = linear_chunk_loss(
      per_chunk, head_params(cfg, params), h_S, (h_T, targets, reverse_NC),
      head_params(cfg, teacher_params), coef_NC, chunk)
  metrics = {
      "opsd/teacher_kl": masked_mean(estimate_NC, weight_NC),
      "opsd/selected_frac": jnp.mean(selected_N),
      "opsd/empty_selection": (trained == 0).astype(jnp.float32),
      "entropy": masked_mean(entropy_NC, weight_NC),
      "trained_tokens": trained,
  }
  return loss, metrics
