"""The earlier reader's API (`read`, `iter_records`, `normalize`, `ReadStats`, `DataError`), kept
for tfds_builder and callers not yet on `opsd_jax.data.load`.

Unlike `load`, "auto" picks the layout per row as before (a file may mix GSM8K and MATH rows):
`problem` -> a MATH-family layout by its keys, `question` -> GSM8K. A row without a reference
solution is a bad row, since the tfds records store text in every field.
"""
from __future__ import annotations

import dataclasses

from opsd_jax.data import files, formats
from opsd_jax.data.formats import DataError, RowError

FORMATS = formats.FORMATS

__all__ = ["DataError", "FORMATS", "ReadStats", "iter_records", "normalize", "read"]


@dataclasses.dataclass
class ReadStats:
  rows: int = 0          # rows read (non-empty lines of a JSONL file)
  kept: int = 0
  skipped: int = 0
  first_errors: list = dataclasses.field(default_factory=list)  # up to 5 "file:line: why"


def normalize(row, fmt: str = "auto") -> dict:
  """One parsed row -> {"question", "reference", "answer"}; ValueError says what is wrong."""
  layout = fmt
  if fmt == "auto":
    if not isinstance(row, dict):
      raise RowError("not an object", f"a JSON {type(row).__name__}")
    if "problem" in row:
      layout = formats.detect(row, row) or "math"
    elif "question" in row:
      layout = "gsm8k"
    else:
      raise RowError("neither 'question' (GSM8K) nor 'problem' (MATH)", f"keys: {sorted(row)}")
  record = formats.normalize(row, layout)
  if record["reference"] is None:
    raise RowError("no reference solution")
  return record


def iter_records(path: str, fmt: str = "auto", on_bad_row: str = "error",
                 stats: ReadStats | None = None):
  """Yields normalised records of one data file; fills `stats` as it goes."""
  if fmt not in FORMATS or fmt == "fields":
    raise DataError(f"data format must be one of {FORMATS[:-1]}, got {fmt!r}")
  if on_bad_row not in ("error", "skip"):
    raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  stats = ReadStats() if stats is None else stats
  for where, row in files.open_rows(path).rows:
    stats.rows += 1
    try:
      if isinstance(row, RowError):
        raise row
      record = normalize(row, fmt)
    except RowError as e:
      if on_bad_row == "error":
        raise DataError(f"{where}: {e}") from None
      stats.skipped += 1
      if len(stats.first_errors) < 5:
        stats.first_errors.append(f"{where}: {e}")
      continue
    stats.kept += 1
    yield record


def read(path: str, fmt: str = "auto", on_bad_row: str = "error") -> tuple[list[dict], ReadStats]:
  """All normalised records of a data file and the counts (rows, kept, skipped)."""
  stats = ReadStats()
  records = list(iter_records(path, fmt, on_bad_row, stats))
  if not records:
    raise DataError(f"{path}: no usable rows ({stats.rows} rows, {stats.skipped} skipped)")
  return records, stats
