"""SFT, GRPO and OPSD train steps: `step(state, batch) -> (state, metrics)`, jitted with explicit
in/out shardings (state as train.state.state_shardings, every batch array split over the data axes
on its leading dimension, metrics replicated) and the state donated. The same code runs on one
CPU device and on a (data, fsdp, tensor) mesh. Batch layouts: see opsd_jax/losses.py's doc.

LoRA (model_cfg.lora_rank > 0): state.params are the adapters, the only leaves differentiated and
updated; the frozen base (state.base_params) enters the jitted step as its own argument, not
donated, and comes back as the very same buffers. The model sees lora.combine(base, adapters).

Every step guards the update: when the loss or the gradient norm is not finite, params, optimizer
state and teacher stay as they were, `skipped_steps` counts it and metrics["nonfinite"] is 1; the
loop decides whether to stop (on_nonfinite="stop") or go on (on_nonfinite="skip").

Each stage's loss is wired here once, as a function of (params, [teacher,] batch) that the step
differentiates: sft_loss_sum, grpo_loss, opsd_loss. memory.py traces these same functions to plan
the activations. `shardings` (train.state.ParamShardings) passes a stage's parameter shardings,
computed once per stage; without it they are computed here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from opsd_jax import lora, losses, model, parallel
from opsd_jax.train import optim
from opsd_jax.train import state as state_lib


def _mesh_or_default(mesh):
  return mesh if mesh is not None else parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def batch_sharding(mesh) -> NamedSharding:
  """Leading dim over (data, fsdp), rest replicated; a prefix for a whole batch dict."""
  return NamedSharding(mesh, P(parallel.BATCH))


def _jit_step(step_fn, model_cfg, optimizer, mesh, teacher: bool, param_shardings=None):
  """`step(state, batch)` around step_fn(state, base, batch), base = the LoRA base or None."""
  if param_shardings is None:
    param_shardings = state_lib.param_shardings(model_cfg, mesh)
  shardings = state_lib.state_shardings(model_cfg, optimizer, mesh, teacher, param_shardings)
  out_shardings = (shardings, parallel.replicated(mesh))
  inner = step_fn

  def step_fn(*args):  # the model reads the mesh to keep activations batch-split (model.py)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return inner(*args)

  if not lora.enabled(model_cfg):
    return jax.jit(lambda state, batch: step_fn(state, None, batch),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=out_shardings,
                   donate_argnums=0)
  jitted = jax.jit(step_fn, in_shardings=(shardings, param_shardings.base, batch_sharding(mesh)),
                   out_shardings=out_shardings, donate_argnums=0)

  def step(state, batch):
    base = state.base_params
    if base is None:
      raise ValueError("LoRA step: state.base_params is None (create the state with "
                       "base_params=the frozen base)")
    new_state, metrics = jitted(state.replace(base_params=None), base, batch)
    return new_state.replace(base_params=base), metrics

  return step


def _apply_update(state, grads, loss, optimizer, metrics, update_teacher=None):
  """One optimizer update, skipped (everything kept) when loss or gradients are not finite.
  update_teacher(teacher_params, new_params) -> new teacher (EMA), or None to keep it."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  def keep_if_bad(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_bad(params, state.params),
      opt_state=keep_if_bad(opt_state, state.opt_state),
      teacher_params=(state.teacher_params if update_teacher is None else keep_if_bad(
          update_teacher(state.teacher_params, params), state.teacher_params)),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                 learning_rate=optim.current_learning_rate(opt_state),
                 nonfinite=(~finite).astype(jnp.float32))
  return new_state, metrics


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def sft_loss_sum(model_cfg, params, batch, chunk: int = 256):
  """(sum of -log p over trained tokens, sum of entropies there) for an SFT batch."""
  tokens = batch["tokens"]
  T = tokens.shape[1]
  segment_ids = batch.get("segment_ids")
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  positions = batch.get("positions")
  if positions is None:
    positions = model.positions_from_mask(segment_ids != 0)
  # The last position predicts nothing: its hidden state is dropped before the unembedding.
  h = model.hidden_states(model_cfg, params, tokens, None, positions, segment_ids)[:, :T - 1]
  mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
  nll_sum, ent = losses.nll_sum_chunked(model_cfg, params, h, tokens[:, 1:], mask, chunk)
  return nll_sum, jnp.sum(ent * mask)


def make_sft_step(model_cfg, sft_cfg, optimizer, mesh=None, *, chunk: int = 256,
                  shardings=None):
  """SFT: masked next-token cross-entropy = sum over trained tokens / trained tokens of the
  GLOBAL batch. sft_cfg.micro_batches splits the batch (rows m, m + M, ...) into a lax.scan that
  sums gradients of loss SUMS; dividing once by the global count makes the gradient identical to
  one big batch's."""
  mesh = _mesh_or_default(mesh)
  M = int(sft_cfg.micro_batches)

  def step(state, base, batch):
    B = batch["tokens"].shape[0]
    if B % M:
      raise ValueError(f"sft.micro_batches ({M}) must divide the batch size ({B})")
    count = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    grad_fn = jax.value_and_grad(
        lambda p, mb: sft_loss_sum(model_cfg, lora.combine(base, p), mb, chunk), has_aux=True)

    def micro(x):  # [B, ...] -> [M, B / M, ...]; the B / M dim keeps the data sharding
      x = jnp.swapaxes(x.reshape(B // M, M, *x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, P(None, parallel.BATCH)))

    def accumulate(carry, mb):
      grads, loss_sum, ent_sum = carry
      (l, e), g = grad_fn(state.params, mb)
      return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), loss_sum + l,
              ent_sum + e), None

    # Sums in float32 whatever the param dtype (bf16 sums of M micro-batches lose the small
    # ones); the mean goes to the optimizer in the param dtype, as a one-batch gradient would.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    if M == 1:
      (grads, loss_sum, ent_sum), _ = accumulate((zeros, 0.0, 0.0), batch)
    else:
      (grads, loss_sum, ent_sum), _ = jax.lax.scan(
          accumulate, (zeros, jnp.float32(0), jnp.float32(0)), jax.tree.map(micro, batch))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    metrics = {"entropy": ent_sum / denom, "trained_tokens": count}
    new_state, metrics = _apply_update(state, grads, loss_sum / denom, optimizer, metrics)
    return new_state, metrics

  return _jit_step(step, model_cfg, optimizer, mesh, False, shardings)


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def rollout_logprobs(model_cfg, params, batch, temperature: float = 1.0, chunk: int = 256,
                     with_entropy: bool = False):
  """Learner log-probs [N, C] of the completion tokens of a rollout batch (logits / temperature)."""
  C = batch["completion_mask"].shape[1]
  P_ = batch["tokens"].shape[1] - C
  return losses.logprobs_chunked(model_cfg, params, batch["tokens"], batch["mask"], P_, C,
                                 temperature, chunk, with_entropy=with_entropy)


def make_score_fn(model_cfg, mesh=None, *, temperature: float = 1.0, chunk: int = 256,
                  shardings=None):
  """Jitted `score(params, batch) -> logprobs [N, C]` (float32): the learner's own temperature-
  scaled log-probs, for old_logprobs (current params at rollout time) and ref_logprobs (the
  reference params). Needs batch keys tokens, mask, completion_mask. With LoRA, params are
  lora.combine(base, adapters), or the base alone (adapters off: the stage's reference)."""
  mesh = _mesh_or_default(mesh)

  def score(params, batch):
    batch = {k: batch[k] for k in ("tokens", "mask", "completion_mask")}
    return rollout_logprobs(model_cfg, params, batch, temperature, chunk)

  if shardings is None:
    shardings = state_lib.param_shardings(model_cfg, mesh)

  def jitted(param_shardings):
    return jax.jit(score, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=batch_sharding(mesh))

  with_adapters = jitted(shardings.model)
  if not lora.enabled(model_cfg):
    return with_adapters
  base_only = jitted(shardings.base)
  return lambda params, batch: (with_adapters if lora.has_adapters(params) else base_only)(
      params, batch)


def grpo_options(cfg) -> dict:
  """The GRPO loss settings that come from outside the rlvr section, for make_grpo_step,
  make_score_fn and memory.py alike: learner logits divided by the sampling temperature (floored:
  temperature 0 means greedy sampling, scored at a temperature near 0), the loss chunk, and the
  Dr. GRPO constant = the sampler's max_new_tokens."""
  return dict(temperature=max(cfg.sampling.temperature, 1e-6), chunk=int(cfg.loss_chunk),
              max_completion_len=int(cfg.sampling.max_new_tokens))


def grpo_loss(model_cfg, rlvr_cfg, *, temperature: float = 1.0, chunk: int = 256,
              max_completion_len: int | None = None):
  """`loss(params, batch) -> (loss, metrics)` of a GRPO mini-batch: the function the step
  differentiates (params: the whole model's, with LoRA base + adapters)."""
  if rlvr_cfg.aggregation not in losses.AGGREGATIONS:
    raise ValueError(f"rlvr.aggregation must be one of {losses.AGGREGATIONS}, got "
                     f"{rlvr_cfg.aggregation!r}")

  def loss_fn(params, batch):
    logprobs, ent = rollout_logprobs(model_cfg, params, batch, temperature, chunk,
                                     with_entropy=True)
    loss, metrics = losses.grpo_objective(
        logprobs, batch["old_logprobs"], batch["advantages"], batch["completion_mask"],
        eps_low=rlvr_cfg.eps_low, eps_high=rlvr_cfg.eps_high, kl_beta=rlvr_cfg.kl_beta,
        ref_logprobs_NC=batch.get("ref_logprobs"), aggregation=rlvr_cfg.aggregation,
        max_completion_len=max_completion_len)
    metrics["entropy"] = losses.masked_mean(ent, batch["completion_mask"])
    return loss, metrics

  return loss_fn


def make_grpo_step(model_cfg, rlvr_cfg, optimizer, mesh=None, *, temperature: float = 1.0,
                   chunk: int = 256, max_completion_len: int | None = None, shardings=None):
  """GRPO: ONE optimizer update on one mini-batch (the loop calls it mu x mini_batches times per
  rollout batch). Batch: tokens, mask, completion_mask, old_logprobs, advantages (+ ref_logprobs
  when rlvr_cfg.kl_beta > 0). `temperature` is the sampling temperature (learner logits are
  divided by it); `max_completion_len` is the Dr. GRPO constant (default: C of the batch)."""
  mesh = _mesh_or_default(mesh)
  loss_fn = grpo_loss(model_cfg, rlvr_cfg, temperature=temperature, chunk=chunk,
                      max_completion_len=max_completion_len)

  def step(state, base, batch):
    if rlvr_cfg.kl_beta > 0 and "ref_logprobs" not in batch:
      raise ValueError("rlvr.kl_beta > 0: the batch needs ref_logprobs [N, C]")
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(lora.combine(base, p), batch), has_aux=True)(state.params)
    new_state, metrics = _apply_update(state, grads, loss, optimizer, metrics)
    return new_state, metrics

  return _jit_step(step, model_cfg, optimizer, mesh, False, shardings)


# --------------------------------------------------------------------------------------------
# OPSD
# --------------------------------------------------------------------------------------------


TEACHERS = ("frozen", "ema", "current")


def _check_teacher(teacher: str):
  if teacher not in TEACHERS:
    raise ValueError(f"opsd.teacher must be one of {TEACHERS}, got {teacher!r}")


def teacher_copy(teacher: str | None, uses_lora: bool) -> bool:
  """Whether the train state holds a teacher copy (state.teacher_params): the EMA always (with
  LoRA an EMA of the adapters); the frozen snapshot only without LoRA (with LoRA the frozen
  teacher is the base alone, adapters off: the stage's input, held once); 'current' never (the
  student under stop_gradient). None: no teacher (SFT, RLVR). The one place this is decided:
  the stage loop, the OPSD step and the memory plan ask here."""
  if teacher is None:
    return False
  _check_teacher(teacher)
  return teacher == "ema" or (teacher == "frozen" and not uses_lora)


def teacher_in_checkpoint(teacher: str | None) -> bool:
  """Whether a teacher copy changes during the stage and so must be checkpointed: the EMA does;
  the frozen snapshot equals the stage's input, which a resume rebuilds."""
  return teacher == "ema"


def _teacher_of(teacher: str, uses_lora: bool, params, teacher_params, base):
  """The teacher's whole parameter tree in the step (params: the student's, LoRA combined)."""
  if teacher == "current":
    return params
  if uses_lora and teacher == "frozen":
    return base
  return lora.combine(base, teacher_params)


def opsd_loss(model_cfg, opsd_cfg, *, chunk: int = 256):
  """`loss(params, teacher_params, batch) -> (loss, metrics)` of an OPSD mini-batch: the
  function the step differentiates (both the whole model's trees, with LoRA combined)."""
  losses.check_opsd_options(opsd_cfg.divergence, opsd_cfg.estimator, opsd_cfg.reduction,
                            opsd_cfg.rollout_filter)
  clip = None if opsd_cfg.clip < 0 else float(opsd_cfg.clip)

  def loss_fn(params, teacher_params, batch):
    return losses.opsd_loss_chunked(
        model_cfg, params, teacher_params, batch, divergence=opsd_cfg.divergence,
        jsd_beta=opsd_cfg.jsd_beta, clip=clip, temperature=opsd_cfg.loss_temperature,
        estimator=opsd_cfg.estimator, topk=opsd_cfg.topk, reduction=opsd_cfg.reduction,
        rollout_filter=opsd_cfg.rollout_filter, chunk=chunk)

  return loss_fn


def make_opsd_step(model_cfg, opsd_cfg, optimizer, mesh=None, *, chunk: int = 256,
                   shardings=None):
  """OPSD: student = params on the student prompt, teacher on the teacher prompt, same completion
  tokens, divergence chunked over the completion. opsd_cfg.teacher: frozen (state.teacher_params,
  a snapshot never updated), ema (state.teacher_params <- decay t + (1 - decay) params after each
  update), current (params under stop_gradient; state.teacher_params must be None).

  With LoRA the teacher never copies the base: frozen = the base alone (adapters off, i.e. the
  stage's starting model; state.teacher_params None), ema = the base + an EMA of the adapters
  (state.teacher_params), current = the base + the adapters under stop_gradient."""
  mesh = _mesh_or_default(mesh)
  teacher = opsd_cfg.teacher
  uses_lora = lora.enabled(model_cfg)
  uses_copy = teacher_copy(teacher, uses_lora)
  distill = opsd_loss(model_cfg, opsd_cfg, chunk=chunk)

  def loss_fn(adapters_or_params, teacher_params, base, batch):
    params = lora.combine(base, adapters_or_params)
    return distill(params, _teacher_of(teacher, uses_lora, params, teacher_params, base), batch)

  def step(state, base, batch):
    if uses_copy and state.teacher_params is None:
      raise ValueError(f"opsd.teacher={teacher!r} needs state.teacher_params (create "
                       "the state with teacher_params=params)")
    if not uses_copy and state.teacher_params is not None:
      raise ValueError(f"opsd.teacher={teacher!r} "
                       f"{'with LoRA uses the base alone' if uses_lora else 'uses params'} as the "
                       "teacher; create the state without teacher_params")
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.teacher_params, base, batch)
    update_teacher = None
    if teacher == "ema":
      decay = opsd_cfg.ema_decay
      update_teacher = lambda t_params, new: jax.tree.map(  # noqa: E731
          lambda t, p: decay * t + (1.0 - decay) * p, t_params, new)
    new_state, metrics = _apply_update(state, grads, loss, optimizer, metrics, update_teacher)
    return new_state, metrics

  return _jit_step(step, model_cfg, optimizer, mesh, uses_copy, shardings)
