"""Local math data sets as JSONL -> normalised records {"question", "reference", "answer"}.

Two row forms: GSM8K (`question`, `answer` = worked solution ending in "#### N") and
MATH/OpenThoughts (`problem`, `solution`, `answer`). "auto" picks the form per row by its keys.
A bad row (malformed JSON, not an object, a missing or non-string field, a GSM8K answer without
"####") raises DataError naming the file and line, or with on_bad_row="skip" is skipped and
counted.
"""
from __future__ import annotations

import dataclasses
import json
import re

FORMATS = ("auto", "gsm8k", "math")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


class DataError(ValueError):
  """A bad data file or row; the message names the file and line."""


@dataclasses.dataclass
class ReadStats:
  rows: int = 0          # non-empty lines read
  kept: int = 0
  skipped: int = 0
  first_errors: list = dataclasses.field(default_factory=list)  # up to 5 "file:line: why"


def normalize(row, fmt: str = "auto") -> dict:
  """One parsed JSON row -> {"question", "reference", "answer"}; ValueError says what is wrong."""
  if not isinstance(row, dict):
    raise ValueError(f"row is a JSON {type(row).__name__}, expected an object")
  if fmt == "auto":
    fmt = "gsm8k" if "question" in row else "math" if "problem" in row else None
    if fmt is None:
      raise ValueError(f"row has neither 'question' (GSM8K) nor 'problem' (MATH) "
                       f"(keys: {sorted(row)})")
  if fmt == "gsm8k":
    question, solution = _field(row, "question"), _field(row, "answer")
    if "####" not in solution:
      raise ValueError("field 'answer' has no '#### <final answer>' (GSM8K form)")
    reasoning, final = solution.rsplit("####", 1)
    answer = final.strip().replace(",", "")
    if not answer:
      raise ValueError("field 'answer' has nothing after '####'")
    return {"question": question.strip(), "reference": _CALCULATOR.sub("", reasoning).strip(),
            "answer": answer}
  if fmt == "math":
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
      answer = str(answer)
      row = {**row, "answer": answer}
    return {"question": _field(row, "problem").strip(),
            "reference": _field(row, "solution").strip(),
            "answer": _field(row, "answer").strip()}
  raise ValueError(f"data format must be one of {FORMATS}, got {fmt!r}")


def _field(row, name):
  if name not in row:
    raise ValueError(f"missing field {name!r}")
  value = row[name]
  if not isinstance(value, str):
    raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
  if not value.strip():
    raise ValueError(f"field {name!r} is empty")
  try:  # JSON escapes can spell lone surrogates ("\ud800"); tokenizers cannot encode them
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"field {name!r} is not valid Unicode (a lone surrogate at character "
                     f"{e.start})") from None
  return value


def iter_records(path: str, fmt: str = "auto", on_bad_row: str = "error",
                 stats: ReadStats | None = None):
  """Yields normalised records of one JSONL file; fills `stats` as it goes."""
  if fmt not in FORMATS:
    raise DataError(f"data format must be one of {FORMATS}, got {fmt!r}")
  if on_bad_row not in ("error", "skip"):
    raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  stats = ReadStats() if stats is None else stats
  try:
    f = open(path, "rb")  # decoded per line, so a bad byte is reported with its line
  except OSError as e:
    raise DataError(f"cannot read data file {path}: {e.strerror}") from e
  with f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        problem = f"{path}:{line_no}: not valid UTF-8 ({e.reason})"
        if on_bad_row == "error":
          raise DataError(problem) from e
        stats.rows += 1
        stats.skipped += 1
        if len(stats.first_errors) < 5:
          stats.first_errors.append(problem)
        continue
      if not line.strip():
        continue
      stats.rows += 1
      try:
        record = normalize(json.loads(line), fmt)
      except json.JSONDecodeError as e:
        problem = f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})"
      except ValueError as e:
        problem = f"{path}:{line_no}: {e}"
      else:
        stats.kept += 1
        yield record
        continue
      if on_bad_row == "error":
        raise DataError(problem)
      stats.skipped += 1
      if len(stats.first_errors) < 5:
        stats.first_errors.append(problem)


def read(path: str, fmt: str = "auto", on_bad_row: str = "error") -> tuple[list[dict], ReadStats]:
  """All normalised records of a JSONL file and the counts (rows, kept, skipped)."""
  stats = ReadStats()
  records = list(iter_records(path, fmt, on_bad_row, stats))
  if not records:
    raise DataError(f"{path}: no usable rows ({stats.rows} rows, {stats.skipped} skipped)")
  return records, stats
