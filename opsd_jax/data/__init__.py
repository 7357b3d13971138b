"""Task sources (the toy generator, local JSONL -> tfds array_record) and grain pipelines.

`toy` (the embedded default's task), `jsonl` (GSM8K / MATH rows -> normalised records),
`tfds_builder` (JSONL -> array_record data sources; imports tensorflow_datasets, so it is not
imported here) and `pipeline` (shuffled, sharded, resumable batches).
"""
from opsd_jax.data.pipeline import Batches, decode_record, record_batches, sft_batches

__all__ = ["Batches", "decode_record", "record_batches", "sft_batches"]
