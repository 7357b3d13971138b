"""One metrics logger: JSONL in the workdir, TensorBoard event files, and progress on the terminal.

Every record is one JSON line {"stage", "step", "time", ...metrics}; the JSONL file is appended
line by line and flushed, so a killed run loses at most the line being written, and a resumed
run drops the lines past its restored step (`truncate_after`) so metrics equal an uninterrupted
run's, and with them a line a kill cut short.

Every other file we write goes through `atomic_output` / `write_text_atomic`: written under a
temporary name in the same directory and renamed into place, so a reader sees the whole file or
none of it (the old one, if any), never half of it.

Multi-host: only process 0 (`is_primary`) writes: the logger's records, TensorBoard, the progress
bar and every file through `atomic_output` (results, tables, plots); the other processes compute
the same values and write nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np


def is_primary() -> bool:
  """Process 0 of a multi-host run (always true in one process). jax only if already loaded."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def _plain(value: Any):
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


@contextlib.contextmanager
def atomic_output(path: str):
  """Yields a temporary path (same directory, same extension, so writers that infer the format
  from it still work) to write; renames it to `path` when the block succeeds, removes it if not.
  On processes other than process 0 the file is written and then dropped."""
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  stem, ext = os.path.splitext(name)
  tmp = os.path.join(directory, f".{stem}.tmp{os.getpid()}{ext}")
  try:
    yield tmp
    if is_primary():
      _fsync(tmp)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
  with atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def _fsync(path):
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def _complete_lines(path):
  """The parsed records of a JSONL file; a last line a kill cut short (no newline, or not JSON)
  is dropped, it belongs to a step the resume redoes."""
  with open(path) as f:
    lines = f.readlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1 and not line.endswith("\n"):
        continue
      raise ValueError(f"{path}:{i + 1}: not a JSON record: {line[:80]!r}") from None
  return rows


class Logger:
  def __init__(self, workdir: str, tensorboard: bool = True):
    self.primary = is_primary()  # the others log nothing (multi-host)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.primary:
      os.makedirs(workdir, exist_ok=True)
    if tensorboard and self.primary:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.interactive = sys.stderr.isatty()

  def truncate_after(self, stage: str, step: int):
    """Drops the records of `stage` beyond `step` (they belong to work the resume redoes)."""
    if not self.primary or not os.path.exists(self.path):
      return
    kept = [r for r in _complete_lines(self.path) if not _beyond(r, stage, step)]
    write_text_atomic(self.path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))

  def write(self, stage: str, step: int, metrics: dict[str, Any], echo: bool = False):
    if not self.primary:
      return
    record = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key not in ("stage", "step", "time") and isinstance(value, (int, float)) \
            and not isinstance(value, bool) and math.isfinite(value):
          self._tb.add_scalar(f"{stage}/{key}", value, step)
      self._tb.flush()
    if echo:
      shown = {k: v for k, v in record.items() if k not in ("stage", "step", "time")}
      print(f"[{stage} {step}] " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
            flush=True)

  def records(self, stage: str | None = None) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    rows = _complete_lines(self.path)
    return [r for r in rows if stage is None or r["stage"] == stage]

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _beyond(record, stage, step):
  return record.get("stage") == stage and record.get("step", -1) > step


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def progress(total: int, initial: int, desc: str):
  """A tqdm bar on interactive terminals; silent otherwise (the logger echoes lines instead)."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc,
              disable=not (sys.stderr.isatty() and is_primary()),
              dynamic_ncols=True)
