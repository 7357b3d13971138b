"""Row readers for the file types math data ships in: .jsonl, .json, .parquet and a
`datasets.save_to_disk` folder.

`open_rows(path)` returns a Rows: the file type and an iterator of (where, row) pairs, `where`
being "path:line" (JSONL, 1-based) or "path:row i" (0-based, as ds[i]). A row that cannot be
decoded comes as a RowError in place of the row, so the caller can stop on it or skip it and
count it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from opsd_jax.data.formats import DataError, RowError

FILE_TYPES = ("jsonl", "json", "parquet", "disk")  # Rows.file_type, LoadReport.file_type
_BATCH = 1024


@dataclasses.dataclass
class Rows:
  file_type: str
  rows: Iterator[tuple[str, object]]


def open_rows(path: str) -> Rows:
  """The rows of one data file or save_to_disk folder; DataError for anything else."""
  if os.path.isdir(path):
    return _disk(path)
  if not os.path.exists(path):
    raise DataError(f"cannot read data file {path}: no such file or directory")
  lower = path.lower()
  if lower.endswith(".jsonl"):
    return Rows("jsonl", _jsonl(path))
  if lower.endswith(".json"):
    return _json(path)
  if lower.endswith(".parquet"):
    return _parquet(path)
  raise DataError(f"{path}: not a data file this loader reads (.jsonl, .json, .parquet or a "
                  "datasets.save_to_disk folder)")


def _jsonl(path):
  try:
    f = open(path, "rb")  # decoded per line, so a bad byte is reported with its line
  except OSError as e:
    raise DataError(f"cannot read data file {path}: {e.strerror}") from e
  with f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield where, RowError("not valid UTF-8", e.reason)
        continue
      if not line.strip():
        continue
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        yield where, RowError("malformed JSON", f"{e.msg} at column {e.colno}")


def _json(path):
  """A JSON list of rows or {"data": [...]}; a .json file that is really JSON Lines (common on
  the Hub) is read as JSONL."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read data file {path}: {e.strerror}") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason})") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":
      return Rows("jsonl", _jsonl(path))
    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
  if isinstance(value, dict) and isinstance(value.get("data"), list):
    value = value["data"]
  if not isinstance(value, list):
    keys = f" (keys: {sorted(value)})" if isinstance(value, dict) else ""
    raise DataError(f"{path}: expected a JSON list of rows or {{\"data\": [...]}}, got a "
                    f"{type(value).__name__}{keys}")
  return Rows("json", ((f"{path}:row {i}", row) for i, row in enumerate(value)))


def _parquet(path):
  import pyarrow.parquet as pq
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
    raise DataError(f"{path}: not a readable parquet file ({e})") from None
  return Rows("parquet", _batches(path, pf.iter_batches(_BATCH)))


def _batches(path, batches):
  i = 0
  for batch in batches:
    for row in batch.to_pylist():
      yield f"{path}:row {i}", row
      i += 1


def _disk(path):
  """A datasets.save_to_disk folder: through datasets.load_from_disk when datasets is
  installed, else its arrow files (the state.json order) with pyarrow."""
  if os.path.isfile(os.path.join(path, "dataset_dict.json")):
    with open(os.path.join(path, "dataset_dict.json")) as f:
      splits = json.load(f).get("splits", [])
    raise DataError(f"{path}: a DatasetDict folder; point at one split, one of "
                    f"{[os.path.join(path, s) for s in splits]}")
  if not os.path.isfile(os.path.join(path, "state.json")):
    raise DataError(f"{path}: a folder, but not a datasets.save_to_disk folder (no state.json)")
  try:
    import datasets
  except ImportError:
    return disk_rows_pyarrow(path)
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # datasets raises FileNotFoundError / ValueError / pyarrow's errors
    raise DataError(f"{path}: datasets.load_from_disk failed ({e})") from None
  return Rows("disk", _batches(path, ds.with_format("arrow").iter(_BATCH)))


def disk_rows_pyarrow(path: str) -> Rows:
  """A save_to_disk folder's rows without datasets: its arrow files are IPC streams."""
  import pyarrow as pa
  with open(os.path.join(path, "state.json")) as f:
    state = json.load(f)
  names = [d["filename"] for d in state.get("_data_files", [])]
  if not names:
    raise DataError(f"{path}/state.json: no _data_files")
  if state.get("_indices_data_files"):
    raise DataError(f"{path}/state.json: an indices mapping; save it again after "
                    "flatten_indices(), or install datasets")

  def batches():
    for name in names:
      yield from pa.ipc.open_stream(pa.memory_map(os.path.join(path, name)))

  return Rows("disk", _batches(path, batches()))
