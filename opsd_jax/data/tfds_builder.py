"""JSONL files -> a tfds data set stored as array_record, read back with random access.

tfds works without TensorFlow only with file_format="array_record" and data sources, which is
all this uses. Each build is a builder config named by a fingerprint of the files' bytes and
the read options, so editing a file makes a new build and an unchanged one is reused.
"""
from __future__ import annotations

import hashlib
import json
import os

import tensorflow_datasets as tfds

from opsd_jax.data import jsonl

FIELDS = ("question", "reference", "answer")
_COUNTS_FILE = "opsd_read_counts.json"


class MathJsonl(tfds.core.GeneratorBasedBuilder):
  """Normalised math records (question, reference, answer) from local JSONL files."""
  VERSION = tfds.core.Version("1.0.0")
  # tfds looks for a checksums file next to the builder's code; resolving that path imports
  # importlib_resources, which is not a dependency. Local files have no checksums anyway.
  code_path = None

  def __init__(self, *, split_paths: dict[str, str], fmt: str, on_bad_row: str, **kwargs):
    self._split_paths = dict(split_paths)
    self._fmt, self._on_bad_row = fmt, on_bad_row
    self.read_counts = {}
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, path)
            for split, path in self._split_paths.items()}

  def _generate_examples(self, split, path):
    stats = jsonl.ReadStats()
    for i, record in enumerate(jsonl.iter_records(path, self._fmt, self._on_bad_row, stats)):
      yield i, record
    self.read_counts[split] = {"rows": stats.rows, "kept": stats.kept, "skipped": stats.skipped,
                               "first_errors": stats.first_errors}


def _fingerprint(split_paths, fmt, on_bad_row):
  h = hashlib.sha1(f"{fmt}|{on_bad_row}".encode())
  for split in sorted(split_paths):
    path = split_paths[split]
    if not os.path.isfile(path):
      raise jsonl.DataError(f"data file for split {split!r} not found: {path}")
    h.update(split.encode())
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return "v" + h.hexdigest()[:16]


def build(split_paths: dict[str, str], data_dir: str, fmt: str = "auto",
          on_bad_row: str = "error"):
  """Writes (or reuses) the array_record data set; returns (data sources by split, counts by
  split: rows, kept, skipped, first_errors). Sources yield dicts of bytes; see
  pipeline.decode_record."""
  if not split_paths:
    raise jsonl.DataError("build: no splits given")
  config = tfds.core.BuilderConfig(name=_fingerprint(split_paths, fmt, on_bad_row))
  builder = MathJsonl(split_paths=split_paths, fmt=fmt, on_bad_row=on_bad_row, config=config,
                      data_dir=data_dir, file_format="array_record")
  counts_path = os.path.join(builder.data_dir, _COUNTS_FILE)
  if not os.path.isfile(counts_path):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
    for split, path in split_paths.items():
      if split not in builder.read_counts:  # prepared earlier, counts lost: count again
        stats = jsonl.ReadStats()
        for _ in jsonl.iter_records(path, fmt, on_bad_row, stats):
          pass
        builder.read_counts[split] = {"rows": stats.rows, "kept": stats.kept,
                                      "skipped": stats.skipped,
                                      "first_errors": stats.first_errors}
    for split, c in builder.read_counts.items():
      if c["kept"] == 0:
        raise jsonl.DataError(f"{split_paths[split]}: no usable rows ({c['rows']} rows, "
                              f"{c['skipped']} skipped)")
    tmp = counts_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(builder.read_counts, f)
    os.replace(tmp, counts_path)  # last: a build without it is redone
  with open(counts_path) as f:
    counts = json.load(f)
  sources = {split: builder.as_data_source(split=split) for split in split_paths}
  return sources, counts
