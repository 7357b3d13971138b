"""Left-padding prompts to a bucket length, shared by the sampler and the learner's batch layout
(rollouts.learner_batch lays prompts out exactly as the sampler saw them).

Buckets bound the number of distinct prompt shapes, so the number of compiles stays bounded
(gemma's approach).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int] = DEFAULT_BUCKETS,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to the smallest bucket >= the longest prompt: (ids [N, P] int32, mask
  [N, P] bool, True on real tokens). Errors on an empty prompt or one longer than every bucket."""
  if len(prompts) == 0:
    raise ValueError("prompts: got an empty list")
  if not buckets or any(int(b) < 1 for b in buckets):
    raise ValueError(f"prompt_buckets must be positive lengths, got {tuple(buckets)}")
  lengths = [len(p) for p in prompts]
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompts[{i}] is empty")
  longest = max(lengths)
  fitting = sorted(int(b) for b in buckets if int(b) >= longest)
  if not fitting:
    row = lengths.index(longest)
    raise ValueError(f"prompts[{row}] has {longest} tokens, longer than the largest prompt bucket "
                     f"{max(buckets)}")
  width = fitting[0]
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = np.asarray(p, np.int32)
    mask[i, width - len(p):] = True
  return ids, mask
