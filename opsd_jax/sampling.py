"""KV-cached sampler: the public entry point `generate`.

How a call runs:
  1. Prompts are left-padded to the smallest configured bucket that holds the longest one
     (`padding.pad_prompts`), so the number of distinct shapes (and compiles) stays bounded.
  2. Distinct prompts are found, so each is prefilled once and its `num_samples` rows (a GRPO
     group) copy its cache.
  3. One jitted decode loop (`sampler_loop.SamplerLoop`) samples every row, drawing tokens with
     the `token_sampling` method the settings name. Static batching decodes all rows at once;
     continuous batching decodes `num_slots` rows at a time and refills a slot as soon as its row
     ends, instead of idling until the batch's longest row ends.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from opsd_jax import parallel, sampler_loop, token_sampling
from opsd_jax.config import ModelConfig
from opsd_jax.padding import DEFAULT_BUCKETS, pad_prompts


@dataclasses.dataclass
class SampleOutput:
  """Rows are prompt-major: prompt i's samples are rows i * num_samples ... (i + 1) * num_samples - 1.

  tokens [N, T_new] int32, 0 after a row stops (the EOS token itself is kept and counted);
  logprobs [N, T_new]: log-prob of each token under the distribution sampled from (after
  temperature, top-k, top-p; 0 for greedy); lengths [N]; finished [N] (stopped on EOS);
  learner_logprobs [N, T_new] or None: untruncated log_softmax(logits / T) at the token (T = 1 for
  greedy); num_prefills: prompt prefills that ran (one per distinct prompt).
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  finished: np.ndarray
  learner_logprobs: np.ndarray | None
  num_prefills: int


def _check_args(cfg, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, eos_ids,
                num_slots):
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if num_slots is not None and num_slots < 1:
    raise ValueError(f"num_slots must be >= 1, got {num_slots}")
  for i, p in enumerate(prompts):
    bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
  for e in eos_ids:
    if not 0 <= int(e) < cfg.vocab_size:
      raise ValueError(f"eos id {e} outside the vocabulary [0, {cfg.vocab_size})")


def _round_up(n, m):
  return -(-n // m) * m


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, rng: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, eos_ids: Sequence[int] = (),
             prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
             return_learner_logprobs: bool = False, continuous_batching: bool = False,
             num_slots: int | None = None, mesh: jax.sharding.Mesh | None = None,
             param_shardings: Any = None) -> SampleOutput:
  """Samples `num_samples` completions of each prompt (lists of token ids). See `SampleOutput`.

  temperature 0 = greedy; top_k = 0 and top_p = 1 switch truncation off; eos_ids = () never stops
  early. continuous_batching decodes `num_slots` rows at a time (default min(rows, 32)), refilling
  a slot as soon as its row ends; static batching decodes all rows at once. With a mesh, slots are
  split over ("data", "fsdp") and KV heads over "tensor"; the key alone fixes the samples.
  param_shardings: `parallel.param_shardings(cfg, mesh)` when the caller holds it already (it is
  derived from the abstract parameters otherwise, on every call).
  """
  prompts = [list(p) for p in prompts]
  _check_args(cfg, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, eos_ids,
              num_slots)
  ids_NP, mask_NP = pad_prompts(prompts, prompt_buckets)
  if ids_NP.shape[1] + max_new_tokens > cfg.max_position:
    raise ValueError(f"prompt bucket {ids_NP.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"the model's max_position {cfg.max_position}")

  # Distinct prompts, each prefilled once; rows point at them.
  distinct: dict[tuple[int, ...], int] = {}
  prompt_index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
  first_of = {u: i for i, u in reversed(list(enumerate(prompt_index)))}
  order = [first_of[u] for u in range(len(distinct))]
  num_rows = len(prompts) * num_samples
  row_prompt = np.repeat(np.asarray(prompt_index, np.int32), num_samples)

  dp = parallel.data_parallel_size(mesh) if mesh is not None else 1
  if continuous_batching:
    slots = min(num_rows, 32) if num_slots is None else num_slots
  else:
    slots = num_rows
  slots = _round_up(slots, dp)
  U = _round_up(len(distinct), dp)
  ids_UP = np.zeros((U, ids_NP.shape[1]), np.int32)
  mask_UP = np.zeros((U, ids_NP.shape[1]), bool)
  ids_UP[:len(order)], mask_UP[:len(order)] = ids_NP[order], mask_NP[order]
  mask_UP[len(order):, -1] = True  # padding prompts: one pad token, never used

  cache_sharding = batch_sharding = None
  if mesh is not None:
    tensor = "tensor" if cfg.n_kv_heads % mesh.shape["tensor"] == 0 else None
    cache_sharding = NamedSharding(mesh, P(parallel.BATCH, tensor, None, None))
    batch_sharding = parallel.batch_sharding(mesh, 2)
    if param_shardings is None:
      param_shardings = parallel.param_shardings(cfg, mesh)
    params = jax.device_put(params, param_shardings)
    # every process holds all prompts (multi-host: each feeds its rows of the global arrays)
    ids_UP, mask_UP = parallel.shard_global_batch((ids_UP, mask_UP), mesh)
  loop = sampler_loop.SamplerLoop(
      cfg=cfg, num_rows=num_rows, num_slots=slots, max_new_tokens=int(max_new_tokens),
      method=token_sampling.token_sampler(temperature, top_k, top_p),
      eos_ids=tuple(int(e) for e in eos_ids), grow_cache=not continuous_batching,
      cache_sharding=cache_sharding, batch_sharding=batch_sharding)
  tokens, logprobs, learner, lengths, finished = loop.sample(params, ids_UP, mask_UP, row_prompt,
                                                             rng)
  # whole arrays on every process (multi-host: gathered from the other processes' devices)
  tokens, logprobs, lengths, finished = parallel.to_host((tokens, logprobs, lengths, finished))
  return SampleOutput(
      tokens=tokens, logprobs=logprobs, lengths=lengths, finished=finished,
      learner_logprobs=parallel.to_host(learner) if return_learner_logprobs else None,
      num_prefills=len(distinct))
