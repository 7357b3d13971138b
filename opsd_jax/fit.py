"""Rows whose prompts cannot fit the sampler are dropped when the data is loaded, not mid-stage.

A prompt longer than the largest `sampling.prompt_buckets` entry, or one that leaves fewer than
`max_new_tokens` positions before the model's `max_position`, would stop a stage in the sampler
(or the learner layout) after steps nobody saved. So every row's student prompt (each thinking
mode a stage will sample it in) and, when OPSD runs, its teacher prompt are tokenised once at
set-up; rows that cannot fit are dropped and counted by reason, and the counts are printed, shown
by --dry_run and written to results.json.
"""
from __future__ import annotations

import collections
import dataclasses

from opsd_jax import prompts as prompts_lib


@dataclasses.dataclass
class FitReport:
  """What one set lost to prompt length: rows before, rows kept, and drops per reason."""
  name: str
  rows: int
  kept: int
  dropped: dict[str, int]
  longest_student: int = 0
  longest_teacher: int = 0

  def line(self) -> str:
    if not self.dropped:
      return (f"{self.name}: all {self.rows} rows fit (longest student prompt "
              f"{self.longest_student} tokens"
              + (f", teacher {self.longest_teacher}" if self.longest_teacher else "") + ")")
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
    return f"{self.name}: dropped {self.rows - self.kept} of {self.rows} rows ({why})"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _lengths(tok, texts: list[str]) -> list[int]:
  batch = getattr(getattr(tok, "tk", None), "encode_batch", None)  # HF tokenizers: one call
  if batch is not None:
    return [len(e.ids) for e in batch(texts, add_special_tokens=False)]
  return [len(tok.encode(t)) for t in texts]


def limit(buckets, max_position: int, max_new_tokens: int) -> int:
  """The longest prompt the sampler takes: the largest bucket, and room for the completion."""
  return min(max(int(b) for b in buckets), max_position - max_new_tokens)


def fit(name, rows, tok, template, *, student_modes, prompt_limit, teacher=None):
  """(kept rows, FitReport). `student_modes`: the thinking modes the student prompt is sampled in;
  `teacher`: the OPSD section (teacher_context, teacher_thinking, student_thinking,
  teacher_thought) when teacher prompts must fit too, else None. A row is dropped for the first
  prompt of it that is too long, and counted under that role."""
  prompts = [("student", [prompts_lib.student_text(template, r["question"], thinking=thinking)
                          for r in rows]) for thinking in sorted(set(student_modes))]
  if teacher is not None:
    prompts.append(("teacher", [teacher_text(template, r, teacher) for r in rows]))
  too_long = collections.Counter()
  bad = [False] * len(rows)
  longest = collections.Counter()
  for role, texts in prompts:
    for i, n in enumerate(_lengths(tok, texts)):
      longest[role] = max(longest[role], n)
      if n > prompt_limit and not bad[i]:
        bad[i] = True
        too_long[f"{role} prompt over {prompt_limit} tokens"] += 1
  kept = [r for r, b in zip(rows, bad) if not b]
  return kept, FitReport(name, len(rows), len(kept), dict(too_long), longest["student"],
                         longest["teacher"])


def teacher_text(template, row, o) -> str:
  """The teacher's prompt text of one row, as OPSD renders it (train/opsd.py)."""
  return prompts_lib.teacher_text(template, row["question"], row["reference"],
                                  answer=row["answer"], **prompts_lib.teacher_settings(o))
