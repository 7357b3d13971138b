"""grain pipelines: shuffled, repeated, per-process sharded batches with a JSON iterator state.

Every iterator here has `get_state() -> dict` (plain JSON types) and `set_state(dict)`; the
checkpoint stores the state and a restored iterator yields exactly the batches the original
would have yielded next. Shuffling reshuffles each epoch (grain's index shuffle, by seed).

Batch sizes are global: each of `process_count` processes yields `batch_size // process_count`
rows, its own contiguous block of each global batch (process p: rows p*b .. (p+1)*b - 1, the rows
`parallel.shard_batch` expects from it). Every process shuffles with the same seed, so global
batch k is exactly the batch k a single process would yield: a run's data does not depend on how
many processes read it, and the iterator state is the same on every process (the checkpoint keeps
process 0's). Record batches read only this process's rows; packed SFT batches are packed
globally on every process (packing needs the whole batch) and each keeps its rows.
"""
from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np


def _shard(shard):
  if shard is None:
    import jax
    return jax.process_index(), jax.process_count()
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
  return index, count


def _local_batch(batch_size, count):
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of the process "
                     f"count ({count})")
  return batch_size // count


def _base(source, seed, shuffle, num_epochs):
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError("no data (the source has 0 rows)")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs)


def _own_batches(ds, local_batch, drop_remainder, batch_fn, index, count):
  """Batches of `local_batch` consecutive rows; process `index` takes every `count`-th one from
  its own: together the processes' k-th batches are the k-th global batch, in process order."""
  ds = ds.batch(local_batch, drop_remainder=drop_remainder, batch_fn=batch_fn)
  return ds[index::count] if count > 1 else ds


class Batches:
  """An iterator of batches with a saveable position; wraps a grain DatasetIterator."""

  def __init__(self, dataset, info=None):
    self._dataset = dataset
    self._it = iter(dataset)
    self.info = dict(info or {})

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)


def decode_record(record) -> dict:
  """A tfds record (bytes values) -> the same dict with str values."""
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


def record_batches(source: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True,
                   num_epochs: int | None = None, drop_remainder: bool = True,
                   shard: tuple[int, int] | None = None) -> Batches:
  """Batches (lists) of normalised records {"question", "reference", "answer"} from a list or
  a tfds data source, e.g. the prompts of RLVR / OPSD steps. num_epochs None = repeat forever."""
  index, count = _shard(shard)
  local_batch = _local_batch(batch_size, count)
  ds = _base(source, seed, shuffle, num_epochs).map(decode_record)
  return Batches(_own_batches(ds, local_batch, drop_remainder, list, index, count))


def _clip(example, seq_len):
  prompt, completion = (list(map(int, x)) for x in example)
  if not prompt:
    raise ValueError("sft example with an empty prompt: its first completion token has no "
                     "position to be predicted from")
  if not completion:
    raise ValueError("sft example with an empty completion")
  tokens = (prompt + completion)[:seq_len]
  mask = ([0] * len(prompt) + [1] * len(completion))[:seq_len]
  return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)


def sft_batches(examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
                seq_len: int, pad_id: int, packing: bool = False, seed: int = 0,
                num_epochs: int | None = None, shard: tuple[int, int] | None = None,
                shuffle: bool = True) -> Batches:
  """(prompt_ids, completion_ids) pairs -> dicts of int32 arrays [B, T]:
  tokens (pad_id where empty); loss_mask 1 where token t is a completion token (EOS included),
  to be predicted from position t-1; segment_ids 1.. per sequence, 0 = pad; positions 0.. within
  each sequence. packing=True packs several sequences per row (first fit); a sequence never
  spans two rows. Sequences longer than seq_len are cut at seq_len (counted in
  `info["truncated"]`); ones whose prompt alone fills seq_len are dropped (`info["dropped"]`).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  kept, truncated, dropped = [], 0, 0
  for example in examples:
    tokens, mask = _clip(example, seq_len)
    if not mask.any():
      dropped += 1
      continue
    truncated += len(example[0]) + len(example[1]) > seq_len
    kept.append((tokens, mask))
  if not kept:
    raise ValueError(f"no sft example fits seq_len={seq_len} ({dropped} dropped)")
  info = {"examples": len(kept), "truncated": int(truncated), "dropped": dropped}
  index, count = _shard(shard)
  local_batch = _local_batch(batch_size, count)
  ds = _base(kept, seed, shuffle, num_epochs)
  if packing:
    ds = ds.map(lambda e: {"tokens": e[0], "loss_mask": e[1]}).to_iter_dataset()
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle,
        padding_struct={"tokens": pad_id, "loss_mask": 0})
    rows = slice(index * local_batch, (index + 1) * local_batch)
    ds = ds.map(_rename_packed).batch(batch_size, drop_remainder=True)
    if count > 1:
      ds = ds.map(lambda b: {k: v[rows] for k, v in b.items()})
    return Batches(ds, info)
  ds = ds.map(lambda e: _pad(e, seq_len, pad_id))
  return Batches(_own_batches(ds, local_batch, True, None, index, count), info)


def _pad(example, seq_len, pad_id):
  tokens, mask = example
  n = len(tokens)
  out = {"tokens": np.full(seq_len, pad_id, np.int32), "loss_mask": np.zeros(seq_len, np.int32),
         "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32)}
  out["tokens"][:n] = tokens
  out["loss_mask"][:n] = mask
  out["segment_ids"][:n] = 1
  out["positions"][:n] = np.arange(n)
  return out


def _rename_packed(row):
  return {"tokens": row["tokens"], "loss_mask": row["loss_mask"],
          "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}
