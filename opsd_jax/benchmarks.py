"""Evaluation of one set of parameters on every named benchmark of the run, resumable.

Each benchmark (eval.sets, or data.test_path as the one set) is sampled in chunks of problems;
each finished chunk's graded samples are appended to `<workdir>/eval/<label>/<set>.jsonl`, so a
rerun after a crash or preemption continues at the first unfinished chunk with the same random
keys (a chunk's key depends on the set and the chunk, not on what ran before). The files keep
every response's text: they are what a researcher reads when a number looks wrong.

The result of one evaluation: `benchmarks[name]` = evaluate.summarize's metrics plus `settings`
(thinking mode included), and at the top level the mean of each metric over the benchmarks (the
paper's summary row; with one benchmark, that benchmark's figures).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import numpy as np

from opsd_jax import evaluate, parallel
from opsd_jax import rollouts as rollouts_lib

THINKING = ("student", "on", "off")  # eval.thinking

# Metrics averaged over benchmarks for the summary row.
SUMMARY_KEYS = ("accuracy", "problem_accuracy", "truncation_rate", "mean_length",
                "mean_length_correct", "mean_length_incorrect", "hesitation_mean_per_response",
                "hesitation_per_1k_tokens", "hesitation_response_fraction")


def thinking_mode(cfg, student_thinking: bool) -> bool:
  """eval.thinking: 'student' evaluates in the mode the stage's student sampled in."""
  return {"on": True, "off": False}.get(cfg.eval.thinking, student_thinking)


def stage_thinking(cfg, stage: str) -> bool:
  """The student's thinking mode in a stage: OPSD's opsd.student_thinking, on elsewhere."""
  return bool(cfg.opsd.student_thinking) if stage == "opsd" else True


def evaluate_stage(run, params, stage: str) -> dict[str, Any]:
  """A stage's output, in the mode its student sampled in (eval.thinking may override)."""
  return evaluate_params(run, params, stage, stage_thinking(run.cfg, stage))


def set_settings(cfg, name: str) -> tuple[int, int]:
  """(num_problems, samples_per_problem) of one benchmark (-1 in eval.sets: eval's default)."""
  e = cfg.eval
  entry = e.sets[name] if name in e.sets else {}
  problems = entry.get("num_problems", -1)
  samples = entry.get("samples_per_problem", -1)
  return (e.num_problems if problems == -1 else problems,
          e.samples_per_problem if samples == -1 else samples)


def _safe(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "eval"


def evaluate_params(run, params, label: str, thinking: bool = True) -> dict[str, Any]:
  """Every benchmark of `run.eval_sets`, then their mean, with the settings stated in the
  result. `thinking` is the student's mode; eval.thinking='on'/'off' overrides it."""
  thinking = thinking_mode(run.cfg, thinking)
  t0 = time.time()
  per_set = {}
  for index, (name, problems) in enumerate(run.eval_sets.items()):
    per_set[name] = _evaluate_set(run, params, label, index, name, problems, thinking)
  summary = {k: float(np.mean([r[k] for r in per_set.values()])) for k in SUMMARY_KEYS
             if all(k in r for r in per_set.values())}
  first = next(iter(per_set.values()))
  summary.update(label=label, seconds=round(time.time() - t0, 1), benchmarks=per_set,
                 settings=dict(first["settings"], benchmarks=list(per_set)))
  if len(per_set) == 1:  # one benchmark: its every metric at the top level, as before
    summary.update({k: v for k, v in first.items() if k != "settings"})
  return summary


def _evaluate_set(run, params, label, set_index, name, problems, thinking):
  e = run.cfg.eval
  num_problems, samples = set_settings(run.cfg, name)
  problems = problems[:num_problems]
  settings = dict(num_problems=len(problems), samples=samples, temperature=e.temperature,
                  top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens,
                  thinking=thinking, answer_after_think=e.answer_after_think)
  path = eval_path(run.workdir, label, name)
  chunk = max(1, e.batch_size // samples)
  chunks = [list(range(s, min(s + chunk, len(problems)))) for s in range(0, len(problems), chunk)]
  done = parallel.broadcast_object(_read_chunks(path, settings) if parallel.is_primary() else None)
  base = jax.random.fold_in(jax.random.key(run.cfg.seed + 10_000), set_index)
  for c, ids in enumerate(chunks):
    if c in done:
      continue
    ro = rollouts_lib.sample_and_grade(
        run.sampler, params, [problems[i] for i in ids], num_samples=samples,
        temperature=e.temperature,
        top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens,
        rng=jax.random.fold_in(base, c), thinking=thinking)
    done[c] = dict(chunk=c, problem_ids=[ids[i] for i in ro.problem_ids.tolist()],
                   correct=ro.correct.tolist(), lengths=ro.lengths.tolist(),
                   truncated=ro.truncated.tolist(), answers=list(ro.extracted), texts=ro.texts)
    if parallel.is_primary():
      _append(path, settings, done[c])
  flat = _flatten([done[c] for c in range(len(chunks))])
  result = evaluate.summarize(flat["problem_ids"], flat["correct"], flat["lengths"],
                              flat["truncated"], flat["texts"], answers=flat["answers"])
  result["settings"] = settings
  return result


def eval_path(workdir, label: str, set_name: str) -> str:
  """Where evaluate_params(label) writes the graded samples of one benchmark."""
  return os.path.join(workdir, "eval", _safe(label), f"{_safe(set_name)}.jsonl")


_SAMPLE_KEYS = ("problem_ids", "correct", "lengths", "truncated", "answers", "texts")


def _flatten(chunks) -> dict[str, list]:
  return {k: [v for r in chunks for v in r[k]] for k in _SAMPLE_KEYS}


def read_samples(workdir, label: str, set_name: str) -> dict[str, Any] | None:
  """Every graded sample of an evaluation's benchmark, read back from its file: the per-sample
  lists of _SAMPLE_KEYS and its `settings`; None when there is no file. Read only (a torn last
  line is left out), unlike the resume, which rewrites the file."""
  path = eval_path(workdir, label, set_name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  try:
    settings = json.loads(lines[0])["settings"]
  except (IndexError, KeyError, json.JSONDecodeError):
    return None  # a torn header: nothing finished
  chunks = {}
  for line in lines[1:]:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      break
    chunks[row["chunk"]] = row
  return dict(_flatten([chunks[c] for c in sorted(chunks)]), settings=settings)


def _read_chunks(path, settings) -> dict[int, dict]:
  """The finished chunks of an earlier, interrupted evaluation with the same settings."""
  if not os.path.exists(path):
    return {}
  chunks = {}
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not lines or _header(settings) != lines[0]:
    os.remove(path)  # other settings (or a torn first line): start this benchmark afresh
    return {}
  good = lines[:1]
  for line in lines[1:]:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      # The line a crash cut short: its chunk is sampled again, and the file is rewritten
      # without it so the next append starts on a line of its own.
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(g + "\n" for g in good))
      os.replace(path + ".tmp", path)
      break
    chunks[row["chunk"]] = row
    good.append(line)
  return chunks


def _header(settings) -> str:
  return json.dumps({"settings": settings}, sort_keys=True)


def _append(path, settings, row):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fresh = not os.path.exists(path)
  with open(path, "a", encoding="utf-8") as f:
    if fresh:
      f.write(_header(settings) + "\n")
    f.write(json.dumps(row) + "\n")
