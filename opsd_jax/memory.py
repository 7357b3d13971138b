"""Per-device memory plan of each stage, for `--dry_run`, from the real objects' shapes
(`jax.eval_shape` / abstract tracing: nothing is allocated, the mesh need not exist here).

What is counted, per device of a (data, fsdp, tensor) mesh (`jax.sharding.AbstractMesh`, so a
v5p-8 plan runs on a laptop):
- params, optimizer state, OPSD teacher: the shapes of `model.init` / `optimizer.init` under
  their real shardings (`parallel.param_shardings`, `train.state.shardings_like`), each leaf's
  `NamedSharding.shard_shape` summed: exact.
- gradients: one param-shaped tree in the param dtype (two while SFT accumulates micro-batches),
  plus the optimizer's update tree (float32 with optimizer.state_dtype='float32').
- activations: the residuals the backward pass keeps, i.e. what `jax.vjp` of the stage's real
  loss function (sft_loss_sum / rollout log-probs + grpo_objective / opsd_loss_chunked) saves
  under the model's remat policy, traced for ONE device's share of one micro-batch (rows divided
  over data x fsdp; dims of heads / kv heads / mlp / vocab divided over tensor; a residual shaped
  like a parameter, e.g. the unembedding gradient taken in the forward pass, sharded like it).
  Plus the working set of one layer's backward (with remat: its recomputed forward) and, with
  fsdp > 1, the gathered weights (one layer's and its gradient, the unembedding) - an estimate.
- loss chunk: the [rows, chunk, V] float32 buffers alive inside one chunk of the chunked loss
  (SFT / GRPO: logits, probabilities, their gradient; OPSD: student and teacher of each).
- KV cache: the sampler's real `kv_cache.init_cache` (per-layer buffers of the decode slots, plus
  the prefilled prompt caches), batch over data x fsdp, KV heads over tensor.

A stage's peak is the larger of its train step (state + gradients + activations + loss chunk) and
its sampling (state + KV cache); evaluation (its own sampler settings) is planned as one more row.

Checked against XLA's own accounting on CPU (tests/test_memory.py): the compiled step's
argument + output - aliased (donated) + temp bytes (`compiled.memory_analysis()`, the buffer
assignment: what the device allocator has to provide), for small models under each remat policy,
on one device and on fsdp / tensor meshes of 8 CPU devices, agree with the train-step total within
20 % (the bound the test asserts). Peak RSS would mix in the compiler's own memory and the
allocator's caching, so it is not used. The check uses 10 layers: model.py unrolls scans of <= 8
layers, and an unrolled scan lets CPU XLA undo remat by common-subexpression elimination (measured: the same
bytes for none / full / dots at 4 layers), so there the plan's remat savings are not realised.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from opsd_jax import kv_cache, model, parallel

GiB = 1024 ** 3

# HBM per chip (GiB); accelerator sizes count TensorCores (2 per chip) for v4 / v5p, chips for
# v5e / v6e (gcloud's accelerator types: v4-8 = 4 chips, v5p-8 = 4 chips, v5litepod-16 = 16).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_TPU_NAMES = (("v4-", "v4", 2), ("v5p-", "v5p", 2), ("v5litepod-", "v5e", 1), ("v5e-", "v5e", 1),
              ("v6e-", "v6e", 1))


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  name: str
  family: str
  chips: int

  @property
  def hbm_bytes(self) -> int:
    return HBM_GIB[self.family] * GiB


def tpu_slice(name: str) -> TpuSlice:
  """'v5p-8' -> v5p, 4 chips; 'v5litepod-16' or 'v5e-16' -> v5e, 16 chips; 'v4-8' -> 4 chips."""
  for prefix, family, cores_per_chip in _TPU_NAMES:
    m = re.fullmatch(re.escape(prefix) + r"(\d+)", str(name))
    if m and int(m.group(1)) >= cores_per_chip and int(m.group(1)) % cores_per_chip == 0:
      return TpuSlice(str(name), family, int(m.group(1)) // cores_per_chip)
  raise ValueError(f"plan.tpu: unknown TPU slice {name!r}; expected v4-N, v5p-N (N TensorCores, "
                   "2 per chip), v5litepod-N / v5e-N or v6e-N (N chips), e.g. v5p-8, v5e-16")


def abstract_mesh(mesh_shape) -> AbstractMesh:
  return AbstractMesh(tuple(mesh_shape), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _nbytes(shape, dtype) -> int:
  return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def sharded_bytes(abstract_tree, sharding_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs placed with these shardings."""
  leaves = jax.tree.leaves(abstract_tree)
  shardings = jax.tree.leaves(sharding_tree)
  if len(leaves) != len(shardings):
    raise ValueError(f"sharded_bytes: {len(leaves)} arrays but {len(shardings)} shardings")
  return sum(_nbytes(s.shard_shape(x.shape), x.dtype) for x, s in zip(leaves, shardings))


def _trained_bytes(abstract, optimizer, mesh, param_sh) -> tuple[int, int]:
  """(bytes of the trained tree, bytes of its optimizer state) per device, the optimizer state
  sharded as the train state shards it (moments like their parameters)."""
  from opsd_jax.train import state as state_lib  # local: train imports memory's users
  opt_sh = state_lib.shardings_like(abstract, optimizer, mesh, False, param_sh).opt_state
  return (sharded_bytes(abstract, param_sh),
          sharded_bytes(jax.eval_shape(optimizer.init, abstract), opt_sh))


def state_bytes(model_cfg, optimizer, mesh, teacher: bool = False) -> dict[str, int]:
  """params / optimizer / teacher bytes per device, from eval_shape of the real init functions
  and the train state's real shardings."""
  abstract = jax.eval_shape(functools.partial(model.init, model_cfg), jax.random.key(0))
  params, opt = _trained_bytes(abstract, optimizer, mesh,
                               parallel.param_shardings(model_cfg, mesh))
  return {"params": params, "optimizer": opt, "teacher": params if teacher else 0}


def lora_state_bytes(model_cfg, optimizer, mesh, teacher: bool = False) -> dict[str, int]:
  """With LoRA: params = the frozen base + the adapters, optimizer state over the adapters only,
  and the OPSD teacher copy (steps.teacher_copy: an EMA of the adapters; the frozen teacher is
  the base with adapters off, nothing extra)."""
  from opsd_jax import lora
  base_cfg = lora.base_config(model_cfg)
  base = jax.eval_shape(functools.partial(model.init, base_cfg), jax.random.key(0))
  adapters = nn.unbox(lora.abstract_adapters(model_cfg))
  adapter_bytes, opt = _trained_bytes(adapters, optimizer, mesh,
                                      lora.adapter_shardings(model_cfg, mesh))
  return {"params": sharded_bytes(base, parallel.param_shardings(base_cfg, mesh)) + adapter_bytes,
          "optimizer": opt, "teacher": adapter_bytes if teacher else 0,
          "trained": adapter_bytes}


def saved_residuals(loss_fn, *args):
  """[(ShapeDtypeStruct, description)] of what reverse-mode AD of loss_fn (w.r.t. its first
  argument) keeps for the backward pass, arguments themselves excluded. Traced abstractly."""
  from jax._src import ad_checkpoint  # jax.ad_checkpoint.print_saved_residuals' engine
  out = []
  for aval, desc in ad_checkpoint.saved_residuals(
      lambda p, *rest: loss_fn(p, *rest), *args):
    if "from the argument" in desc:
      continue  # parameters and batch arrays: already counted where they live
    out.append((jax.ShapeDtypeStruct(aval.shape, aval.dtype), desc))
  return out


def _residual_bytes(residuals, model_cfg, mesh_shape, param_fractions) -> tuple[int, int]:
  """(all residual bytes, the scan-stacked part's bytes per layer) on one device. Batch dims are
  already one device's share; a parameter-shaped residual is sharded like that parameter; the
  first heads / kv heads / mlp / vocab dim of anything else is divided over tensor."""
  tensor = mesh_shape[2]
  split = {model_cfg.n_heads, model_cfg.mlp_dim, model_cfg.vocab_size}
  if model_cfg.n_kv_heads % tensor == 0:
    split.add(model_cfg.n_kv_heads)
  total = per_layer = 0
  for x, _ in residuals:
    b = _nbytes(x.shape, x.dtype)
    key = tuple(sorted(x.shape))
    if key in param_fractions:
      b = int(b * param_fractions[key])
    elif tensor > 1 and any(d in split for d in x.shape):
      b //= tensor
    total += b
    if x.ndim >= 3 and x.shape[0] == model_cfg.n_layers:
      per_layer += b // model_cfg.n_layers
  return total, per_layer


def _gathered_bytes(model_cfg, mesh_shape) -> int:
  """FSDP's gathered weights on one device: one layer's weights and their gradient whole over
  fsdp (still split over tensor) while the layer runs, and the unembedding for the chunked loss.
  An estimate (XLA may prefetch the next layer too); 0 without fsdp."""
  fsdp, tensor = mesh_shape[1], mesh_shape[2]
  if fsdp == 1:
    return 0
  abstract = jax.eval_shape(functools.partial(model.init, model_cfg), jax.random.key(0))
  layer = sum(x.size // model_cfg.n_layers * x.dtype.itemsize
              for x in jax.tree.leaves(abstract["layers"]))
  head = abstract["lm_head"]["kernel"] if "lm_head" in abstract else abstract["embed"]["embedding"]
  return (2 * layer + head.size * head.dtype.itemsize) // tensor


def _param_fractions(model_cfg, mesh) -> dict[tuple[int, ...], float]:
  """Sorted shape -> share of it one device holds, for every parameter shape."""
  abstract = jax.eval_shape(functools.partial(model.init, model_cfg), jax.random.key(0))
  shardings = parallel.param_shardings(model_cfg, mesh)
  out = {}
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    out[tuple(sorted(x.shape))] = math.prod(s.shard_shape(x.shape)) / math.prod(x.shape)
  return out


# --------------------------------------------------------------------------------------------
# The stages' loss functions, as their train steps call them
# --------------------------------------------------------------------------------------------


def _sds(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def stage_loss(cfg, model_cfg, stage: str, rows: int, prompt_len: int, completion_len: int):
  """(loss_fn(params, *extra, batch), extra abstract args, abstract batch) of a stage's train
  step for `rows` rows: the very loss functions the steps differentiate (train/steps.py's
  sft_loss_sum, grpo_loss, opsd_loss). SFT: sequences of completion_len tokens (prompt_len
  unused)."""
  from opsd_jax.train import steps  # local: steps imports the train state
  chunk = int(cfg.loss_chunk)
  if stage == "sft":
    batch = dict(tokens=_sds((rows, completion_len)), loss_mask=_sds((rows, completion_len)))
    return (lambda p, b: steps.sft_loss_sum(model_cfg, p, b, chunk)[0]), (), batch
  T = prompt_len + completion_len
  batch = dict(tokens=_sds((rows, T)), mask=_sds((rows, T), bool),
               completion_mask=_sds((rows, completion_len), bool))
  if stage == "rlvr":
    batch.update(old_logprobs=_sds((rows, completion_len), jnp.float32),
                 advantages=_sds((rows,), jnp.float32))
    if cfg.rlvr.kl_beta > 0:
      batch["ref_logprobs"] = _sds((rows, completion_len), jnp.float32)
    grpo = steps.grpo_loss(model_cfg, cfg.rlvr, **steps.grpo_options(cfg))
    return (lambda p, b: grpo(p, b)[0]), (), batch
  batch.update(teacher_tokens=_sds((rows, T)), teacher_mask=_sds((rows, T), bool),
               correct=_sds((rows,), bool))
  opsd = steps.opsd_loss(model_cfg, cfg.opsd, chunk=chunk)
  abstract = jax.eval_shape(functools.partial(model.init, model_cfg), jax.random.key(0))
  return (lambda p, teacher, b: opsd(p, teacher, b)[0]), (abstract,), batch


# Float32 [rows, chunk, V] buffers alive inside one loss chunk: logits, exp / probabilities and
# their gradient for one model; OPSD holds student and teacher of each.
LOSS_CHUNK_BUFFERS = {"sft": 3, "rlvr": 3, "opsd": 6}


def _sampler_cache_bytes(model_cfg, mesh_shape, prompts: int, rows: int, slots: int,
                         prompt_len: int, new_tokens: int) -> int:
  """KV cache of one sampling call on one device: the prefilled prompts' caches and the decode
  slots' caches (both per-layer buffers from kv_cache.init_cache), as sampling.generate sizes
  them."""
  dp = mesh_shape[0] * mesh_shape[1]
  tensor = mesh_shape[2]
  kv_split = tensor if model_cfg.n_kv_heads % tensor == 0 else 1

  def local(batch, length):
    batch = -(-batch // dp) * dp  # generate rounds rows up to the data-parallel size
    cache = jax.eval_shape(lambda: kv_cache.init_cache(model_cfg, batch // dp, length,
                                                       per_layer=True))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) // kv_split

  del rows
  return local(prompts, prompt_len) + local(slots, prompt_len + new_tokens)


def _slots(cfg, rows: int) -> int:
  s = cfg.sampling
  if not s.continuous_batching:
    return rows
  return s.num_slots if s.num_slots else min(rows, 32)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StagePlan:
  stage: str
  shape: str          # the batch in words
  parts: dict         # bytes per device by component
  train_peak: int
  sample_peak: int

  @property
  def total(self) -> int:
    return max(self.train_peak, self.sample_peak)


# Above this share of HBM a plan is "tight": the planner is good to ~20 % and XLA keeps some
# HBM for itself (collectives, fragmentation).
TIGHT = 0.9

COLUMNS = ("params", "optimizer", "teacher", "grads", "activations", "loss_chunk", "kv_cache")


def plan_stage(cfg, model_cfg, stage: str, mesh_shape, optimizer=None) -> StagePlan:
  """Per-device memory of one stage ('sft' | 'rlvr' | 'opsd' | 'eval') on a mesh of this shape."""
  from opsd_jax.train import optim, steps as steps_lib
  mesh = abstract_mesh(mesh_shape)
  dp = mesh_shape[0] * mesh_shape[1]
  tensor = mesh_shape[2]
  if optimizer is None:
    steps = cfg[stage].steps if stage in ("sft", "rlvr", "opsd") else 1
    optimizer = optim.make_optimizer(cfg.optimizer, max(1, steps))
  parts = dict.fromkeys(COLUMNS, 0)
  use_lora = cfg.lora.rank > 0 and stage != "eval"  # evaluation runs merged params
  teacher = steps_lib.teacher_copy(cfg.opsd.teacher if stage == "opsd" else None, use_lora)
  if use_lora:
    from opsd_jax import lora  # adapters train; the update and its gradient are adapter-sized
    model_cfg = lora.with_config(model_cfg, cfg.lora)
    state = lora_state_bytes(model_cfg, optimizer, mesh, teacher)
    trained = state.pop("trained")
  else:
    state = state_bytes(model_cfg, optimizer, mesh, teacher)
    trained = state["params"]
  parts.update(state)
  if stage == "eval":
    parts["optimizer"] = 0  # evaluation holds the parameters only
  resident = parts["params"] + parts["optimizer"] + parts["teacher"]
  s, e = cfg.sampling, cfg.eval
  prompt_len = max(s.prompt_buckets)
  if stage == "eval":
    rows = e.batch_size  # problems per call x samples: rollouts.sample_and_grade's batching
    prompts = max(1, e.batch_size // e.samples_per_problem)
    parts["kv_cache"] = _sampler_cache_bytes(model_cfg, mesh_shape, prompts, rows,
                                             _slots(cfg, rows), prompt_len, e.max_new_tokens)
    shape = (f"{prompts} problems x {e.samples_per_problem} samples per call, "
             f"<= {prompt_len} + {e.max_new_tokens} tokens")
    return StagePlan(stage, shape, parts, 0, resident + parts["kv_cache"])

  if stage == "sft":
    micro = cfg.sft.micro_batches
    rows, seq = cfg.sft.batch_size // micro, cfg.sft.seq_len
    loss_tokens = seq
    shape = f"batch {cfg.sft.batch_size} ({micro} micro) x {seq} tokens"
    sample_rows = prompts = 0
  else:
    c = cfg.rlvr if stage == "rlvr" else cfg.opsd
    per_prompt = c.group_size if stage == "rlvr" else c.rollouts_per_prompt
    sample_rows = c.prompts_per_step * per_prompt
    prompts = c.prompts_per_step
    micro = 1
    rows, seq = sample_rows // c.mini_batches, s.max_new_tokens
    loss_tokens = s.max_new_tokens
    shape = (f"{c.prompts_per_step} prompts x {per_prompt} = {sample_rows} rollouts, "
             f"{c.mini_batches} mini-batches, sequences <= {prompt_len} + {s.max_new_tokens} "
             "tokens")
    if stage == "rlvr" and c.dynamic_sampling == "refill" and c.max_refill_rounds:
      # Refill rounds sample again at the same shapes: more time per step, no more memory.
      shape += (f"; refill: up to {c.max_refill_rounds} more sampling rounds per step "
                f"(<= {(1 + c.max_refill_rounds) * sample_rows} rollouts)")
  local_rows = -(-rows // dp)
  loss_fn, extra, batch = stage_loss(cfg, model_cfg, stage, local_rows, prompt_len, seq)
  abstract = jax.eval_shape(functools.partial(model.init, model_cfg), jax.random.key(0))
  fractions = _param_fractions(model_cfg, mesh)
  saved, _ = _residual_bytes(saved_residuals(loss_fn, abstract, *extra, batch), model_cfg,
                             mesh_shape, fractions)
  # One layer's backward working set: the layer's full forward residuals (recomputed under
  # remat; with remat none they are among `saved` already, but their gradients are as large).
  no_remat = model_cfg.replace(remat="none")
  loss_nr, extra_nr, batch_nr = stage_loss(cfg, no_remat, stage, local_rows, prompt_len, seq)
  _, layer = _residual_bytes(saved_residuals(loss_nr, abstract, *extra_nr, batch_nr), no_remat,
                             mesh_shape, fractions)
  parts["activations"] = saved + layer + _gathered_bytes(model_cfg, mesh_shape)
  grads = trained * (2 if micro > 1 else 1)
  update_bytes = (4 if cfg.optimizer.state_dtype == "float32" or use_lora else
                  jnp.dtype(model_cfg.param_dtype).itemsize)
  itemsize = 4 if use_lora else jnp.dtype(model_cfg.param_dtype).itemsize  # adapters: float32
  parts["grads"] = grads + trained // itemsize * update_bytes
  vocab_local = -(-model_cfg.vocab_size // tensor)
  chunk = min(int(cfg.loss_chunk), loss_tokens)
  parts["loss_chunk"] = LOSS_CHUNK_BUFFERS[stage] * local_rows * chunk * vocab_local * 4
  train_peak = (resident + parts["grads"] + parts["activations"] + parts["loss_chunk"])
  sample_peak = 0
  if sample_rows:
    parts["kv_cache"] = _sampler_cache_bytes(model_cfg, mesh_shape, prompts, sample_rows,
                                             _slots(cfg, sample_rows), prompt_len,
                                             s.max_new_tokens)
    sample_peak = resident + parts["kv_cache"]
  return StagePlan(stage, shape, parts, train_peak, sample_peak)


def plan(cfg, model_cfg, mesh_shape, tpu: TpuSlice | None = None) -> list[StagePlan]:
  """One StagePlan per stage of the experiment, then one for evaluation."""
  return [plan_stage(cfg, model_cfg, stage, mesh_shape) for stage in cfg.stages
          if stage != "eval"] + [
      plan_stage(cfg, model_cfg, "eval", mesh_shape)]


def _gib(b) -> str:
  return f"{b / GiB:.2f}"


def fits(total_bytes: int, tpu: TpuSlice) -> str:
  """'yes', 'tight' (above TIGHT of the chip's HBM) or 'NO'."""
  if total_bytes > tpu.hbm_bytes:
    return "NO"
  return "tight" if total_bytes > TIGHT * tpu.hbm_bytes else "yes"


def format_plan(plans, mesh_shape, tpu: TpuSlice | None = None) -> list[str]:
  """Lines: per stage 'stage X: ... memory per device ~T GiB', then a table in GiB."""
  where = (f"{tpu.name} ({tpu.chips} chips x {HBM_GIB[tpu.family]} GiB HBM)" if tpu else
           f"{math.prod(mesh_shape)} local devices")
  lines = [f"memory plan per device, {where}, mesh (data, fsdp, tensor) = {tuple(mesh_shape)}; "
           "GiB; total = max(train step, sampling)"
           + (f"; fits: total <= HBM, tight above {TIGHT:.0%} of it" if tpu else "") + ":"]
  header = ("stage", *COLUMNS, "train", "sampling", "total") + (("fits",) if tpu else ())
  rows = []
  for p in plans:
    row = [p.stage, *(_gib(p.parts[c]) for c in COLUMNS), _gib(p.train_peak),
           _gib(p.sample_peak), _gib(p.total)]
    if tpu:
      row.append(fits(p.total, tpu))
    rows.append(row)
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  for r in [header, *rows]:
    lines.append("  " + "  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
  return lines
