"""Task sources (the toy generator, local math data files -> records, tfds array_record) and
grain pipelines.

`load` (any .jsonl/.json/.parquet file or save_to_disk folder in a known layout -> normalised
records + LoadReport; formats.py names the layouts), `toy` (the embedded default's task),
`jsonl` (the earlier reader's API), `tfds_builder` (data files -> array_record data sources;
imports tensorflow_datasets, so it is not imported here) and `pipeline` (shuffled, sharded,
resumable batches).
"""
from opsd_jax.data.formats import FORMATS, LAYOUTS, DataError
from opsd_jax.data.loader import ON_BAD_ROW, LoadReport, load
from opsd_jax.data.pipeline import Batches, decode_record, record_batches, sft_batches

# data.kind: the toy task generated on the spot, or files (any that `load` reads).
KINDS = ("toy", "jsonl")
TOY_FAMILIES = ("arithmetic", "strategy")  # data/toy.py, data/toy_strategy.py

__all__ = ["Batches", "DataError", "FORMATS", "KINDS", "LAYOUTS", "LoadReport", "ON_BAD_ROW",
           "TOY_FAMILIES", "decode_record", "load", "record_batches", "sft_batches"]
