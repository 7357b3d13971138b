"""One metrics logger: JSONL in the workdir, TensorBoard event files, and progress on the terminal.

Every record is one JSON line {"stage", "step", "time", ...metrics}; the JSONL file is appended
line by line and flushed, so a killed run loses at most the line being written, and a resumed
run drops the lines past its restored step (`truncate_after`) so metrics equal an uninterrupted
run's.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np


def _plain(value: Any):
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class Logger:
  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.interactive = sys.stderr.isatty()

  def truncate_after(self, stage: str, step: int):
    """Drops the records of `stage` beyond `step` (they belong to work the resume redoes)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = [l for l in lines if l.strip() and not _beyond(json.loads(l), stage, step)]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, stage: str, step: int, metrics: dict[str, Any], echo: bool = False):
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
    with open(self.path) as f:
      rows = [json.loads(l) for l in f if l.strip()]
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
  return tqdm(total=total, initial=initial, desc=desc, disable=not sys.stderr.isatty(),
              dynamic_ncols=True)
