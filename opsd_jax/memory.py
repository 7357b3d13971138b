"""Per-device memory estimate of a stage, for `--dry_run` (analytic; no arrays are allocated).

Counts parameters, gradients and optimizer state sharded over fsdp x tensor; the OPSD teacher
snapshot; activations kept for the backward pass under the remat policy; the sampler's KV cache
(batch over data x fsdp, KV heads over tensor); and the chunked loss's logits. Activation
counts are an upper-bound style estimate (every saved tensor of a pre-norm layer), good to about
the 20 % that planning needs.
"""
from __future__ import annotations

import numpy as np

GiB = 1024 ** 3


def _bytes(dtype: str) -> int:
  return np.dtype("float32" if dtype == "float32" else "uint16").itemsize


def estimate(model_cfg, *, batch: int, seq_len: int, mesh_shape, optimizer_states: int = 2,
             teacher_copy: bool = False, sample_batch: int = 0, cache_len: int = 0,
             loss_chunk: int = 256) -> dict[str, float]:
  """Bytes per device, by component. `batch` is the global batch of the train step."""
  data, fsdp, tensor = mesh_shape
  m = model_cfg
  n = m.num_params()
  pbytes = _bytes(m.param_dtype)
  abytes = _bytes(m.dtype)
  shards = fsdp * tensor
  local_batch = max(1, -(-batch // (data * fsdp)))
  parts = {
      "params": n * pbytes / shards,
      "grads": n * 4 / shards,
      "optimizer": optimizer_states * n * 4 / shards,
      "teacher": n * pbytes / shards if teacher_copy else 0.0,
  }
  per_token_layer = abytes * (4 * m.d_model + (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim
                              + 3 * m.mlp_dim) / tensor
  attn_scores = 4 * m.n_heads * seq_len / tensor  # f32 probabilities, per query token
  tokens = local_batch * seq_len
  if m.remat == "full":
    saved = tokens * m.d_model * abytes * m.n_layers + tokens * (per_token_layer + attn_scores)
  elif m.remat == "dots":
    saved = tokens * m.n_layers * (per_token_layer * 0.6) + tokens * attn_scores
  else:
    saved = tokens * m.n_layers * (per_token_layer + attn_scores)
  parts["activations"] = saved
  # Chunked loss: student (+ teacher) logits of one chunk and their gradient, float32.
  parts["loss_chunk"] = local_batch * min(loss_chunk, seq_len) * m.vocab_size * 4 * 3 / tensor
  if sample_batch and cache_len:
    local_sample = max(1, -(-sample_batch // (data * fsdp)))
    kv_heads_local = max(1, m.n_kv_heads // tensor)
    parts["kv_cache"] = (2 * m.n_layers * local_sample * cache_len * kv_heads_local * m.head_dim
                         * abytes)
  else:
    parts["kv_cache"] = 0.0
  parts["total"] = sum(parts.values())
  return parts


def stage_summary(cfg, model_cfg, stage: str, mesh_shape) -> str:
  s = cfg.sampling
  if stage == "sft":
    batch, seq = cfg.sft.batch_size // cfg.sft.micro_batches, cfg.sft.seq_len
    est = estimate(model_cfg, batch=batch, seq_len=seq, mesh_shape=mesh_shape,
                   loss_chunk=cfg.loss_chunk)
    shape = f"batch {cfg.sft.batch_size} ({cfg.sft.micro_batches} micro) x {seq} tokens"
  else:
    c = cfg.rlvr if stage == "rlvr" else cfg.opsd
    per_prompt = c.group_size if stage == "rlvr" else c.rollouts_per_prompt
    rows = c.prompts_per_step * per_prompt
    seq = max(s.prompt_buckets) + s.max_new_tokens
    est = estimate(model_cfg, batch=rows // c.mini_batches, seq_len=seq, mesh_shape=mesh_shape,
                   teacher_copy=(stage == "opsd" and c.teacher != "current"),
                   sample_batch=rows, cache_len=seq, loss_chunk=cfg.loss_chunk)
    shape = (f"{c.prompts_per_step} prompts x {per_prompt} = {rows} rollouts, "
             f"{c.mini_batches} mini-batches, sequences <= {seq} tokens")
  detail = ", ".join(f"{k} {v / GiB:.3f}" for k, v in est.items() if k != "total")
  return (f"stage {stage}: {getattr(cfg, stage).steps} steps, {shape}; memory per device "
          f"~{est['total'] / GiB:.3f} GiB ({detail} GiB)")
