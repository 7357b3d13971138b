"""Task sources (the toy generator, local math data files -> records, tfds array_record) and
grain pipelines.

`load` (any .jsonl/.json/.parquet file or save_to_disk folder in a known layout -> normalised
records + LoadReport; formats.py names the layouts), `toy` (the embedded default's task),
`jsonl` (the earlier reader's API), `tfds_builder` (data files -> array_record data sources;
imports tensorflow_datasets, so it is not imported here) and `pipeline` (shuffled, sharded,
resumable batches). The pipeline's names are imported on first use, so config.py can import
formats.py without importing grain.
"""
import importlib

from opsd_jax.data.formats import FORMATS, LAYOUTS, DataError
from opsd_jax.data.loader import LoadReport, load

_PIPELINE = ("Batches", "decode_record", "record_batches", "sft_batches")

__all__ = ["DataError", "FORMATS", "LAYOUTS", "LoadReport", "load", *_PIPELINE]


def __getattr__(name):
  if name in _PIPELINE:
    return getattr(importlib.import_module("opsd_jax.data.pipeline"), name)
  raise AttributeError(f"module 'opsd_jax.data' has no attribute {name!r}")
