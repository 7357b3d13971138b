"""`load`: one math data file of any known type and layout -> normalised records + a report.

The layout is detected once per file, from the first row that is an object, so a file nobody
taught the loader stops at once with one line naming its keys; every row is then read in that
layout (formats.py). Bad rows stop the load with "file:line: why" or, with on_bad_row="skip",
are counted per reason in the report.
"""
from __future__ import annotations

import dataclasses
import itertools

from opsd_jax.data import files, formats
from opsd_jax.data.formats import DataError, RowError

MAX_EXAMPLES = 5
NO_REFERENCE = "no reference solution"


@dataclasses.dataclass
class LoadReport:
  """What `load` read: `reasons` counts skipped rows per cause, `examples` holds the first
  few "file:line: why"."""
  path: str
  file_type: str = ""
  layout: str = ""
  rows: int = 0
  kept: int = 0
  skipped: int = 0
  reasons: dict = dataclasses.field(default_factory=dict)
  examples: list = dataclasses.field(default_factory=list)

  def skip(self, where: str, reason: str, why: str) -> None:
    self.skipped += 1
    self.reasons[reason] = self.reasons.get(reason, 0) + 1
    if len(self.examples) < MAX_EXAMPLES:
      self.examples.append(f"{where}: {why}")

  def summary(self) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in self.reasons.items())
    return (f"{self.path}: {self.file_type}, layout {self.layout}; {self.rows} rows read, "
            f"{self.kept} kept, {self.skipped} skipped" + (f" ({reasons})" if reasons else ""))


ON_BAD_ROW = ("error", "skip")  # stop at the first bad row, or skip and count it


def load(path: str, fields: dict | None = None, fmt: str = "auto", on_bad_row: str = "error",
         require_reference: bool = False) -> tuple[list[dict], LoadReport]:
  """Normalised records {"question", "reference", "answer"} of one file, and its LoadReport.

  Args:
    path: a .jsonl, .json or .parquet file, or a datasets.save_to_disk folder.
    fields: {problem, solution, answer} -> the row's keys (dotted for nested ones), for a
      layout the loader does not know; empty roles are ignored.
    fmt: "auto" (detect) or one of formats.LAYOUTS.
    on_bad_row: "error" stops at the first bad row; "skip" skips and counts it.
    require_reference: drop rows without a reference solution (counted, not an error).
  """
  records, report = [], LoadReport(path)
  for record in iter_records(path, fields, fmt, on_bad_row, require_reference, report):
    records.append(record)
  if not records:
    reasons = "; ".join(f"{k}: {v}" for k, v in report.reasons.items()) or "none skipped"
    raise DataError(f"{path}: no usable rows ({report.rows} read; {reasons})")
  return records, report


def iter_records(path, fields=None, fmt="auto", on_bad_row="error", require_reference=False,
                 report: LoadReport | None = None):
  """Yields the records `load` returns, one at a time, filling `report` as it goes."""
  if on_bad_row not in ON_BAD_ROW:
    raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  if fmt not in formats.FORMATS:
    raise DataError(f"data format must be one of {formats.FORMATS}, got {fmt!r}")
  fields = formats.check_fields(fields)
  if fields and fmt not in ("auto", "fields"):
    raise DataError(f"give fields or fmt={fmt!r}, not both")
  if fmt == "fields" and not fields:
    raise DataError("fmt='fields' needs a fields mapping {problem, solution, answer}")
  report = LoadReport(path) if report is None else report
  source = files.open_rows(path)
  report.file_type = source.file_type
  rows = source.rows
  layout = "fields" if fields else fmt
  if layout == "auto":
    layout, rows = _detect(path, rows)
  report.layout = layout or "none"
  for where, row in rows:
    report.rows += 1
    try:
      if isinstance(row, RowError):
        raise row
      record = formats.normalize(row, layout, fields)
    except RowError as e:
      if on_bad_row == "error":
        raise DataError(f"{where}: {e}") from None
      report.skip(where, e.reason, str(e))
      continue
    if require_reference and record["reference"] is None:
      report.skip(where, NO_REFERENCE, NO_REFERENCE)
      continue
    report.kept += 1
    yield record


def _detect(path, rows):
  """(layout, the same rows) from the first row that is an object; DataError naming its keys
  when no layout fits. Layout None when no row is an object (each row is then a bad row)."""
  seen = []
  for item in rows:
    seen.append(item)
    row = item[1]
    if isinstance(row, dict):
      layout = formats.detect(row, row)
      if layout is None:
        raise DataError(f"{item[0]}: unknown data layout (keys: {', '.join(sorted(row))}); "
                        "give fields={problem, solution, answer} (config data.fields) or "
                        f"fmt (one of {formats.LAYOUTS[:-1]})")
      return layout, itertools.chain(seen, rows)
  return None, iter(seen)
