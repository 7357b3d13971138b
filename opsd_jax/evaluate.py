"""Evaluation metrics over graded samples, markdown tables, and plots.

Pure functions of per-sample arrays (problem index, correct, response length in tokens, truncated,
response text); the grading itself is `grader.Grader`, the same one that gives RLVR its reward.

Several named benchmarks per run are reported from the results layout
`results[stage]["benchmarks"][name] = summarize(...) (+ "settings": {..., "thinking": bool})`:
`benchmark_table` (one row per stage and benchmark), `paper_summary` (one row per stage: means
across benchmarks and the change against the previous stage) and `plot_benchmarks`.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Sequence

import numpy as np

# Phrases of re-verification / hesitation in reasoning traces; matched case-insensitively on word
# boundaries ("waiting" and "hmmm" do not count as "wait" and "hmm"); a space or hyphen inside a
# phrase matches either ("double-check" counts as "double check").
HESITATION_MARKERS = ("wait", "hmm", "let me double-check", "alternatively", "let me verify",
                      "double check")
_MARKER_PATTERN = re.compile(
    r"\b(?:" + "|".join(r"[-\s]+".join(map(re.escape, re.split(r"[-\s]+", m)))
                        for m in sorted(HESITATION_MARKERS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE)


def count_hesitation_markers(text: str) -> int:
  """Occurrences of HESITATION_MARKERS in text (non-overlapping, longest phrase first)."""
  return len(_MARKER_PATTERN.findall(text))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
  if not 0 < k <= num_samples:
    raise ValueError(f"pass@k needs 0 < k <= samples per problem, got k={k}, n={num_samples}")
  if num_samples - num_correct < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def _mean(values) -> float:
  values = np.asarray(values, np.float64)
  return float(values.mean()) if values.size else float("nan")


def _median(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.median(values)) if values.size else float("nan")


def summarize(problem_ids: Sequence, correct: Sequence[bool], lengths: Sequence[int],
              truncated: Sequence[bool], texts: Sequence[str] | None = None,
              k: Iterable[int] | int | None = None, answers: Sequence | None = None) -> dict:
  """Metrics of a batch of graded samples (several samples per problem).

  avg@n: mean correctness over all samples (= the mean over problems of per-problem accuracy when
  every problem has n samples, the case reported). pass@k: unbiased estimator per problem, averaged,
  for each k in `k` (default: 1, 2, 4, ... up to n, and n). maj@n: majority vote over `answers`
  (extracted answers, None = no answer) when given. Lengths are in tokens; `texts` give the
  hesitation-marker rates.
  """
  problem_ids = np.asarray(problem_ids)
  correct = np.asarray(correct, np.bool_)
  lengths = np.asarray(lengths, np.float64)
  truncated = np.asarray(truncated, np.bool_)
  n = len(problem_ids)
  for name, values in (("correct", correct), ("lengths", lengths), ("truncated", truncated),
                       ("texts", texts), ("answers", answers)):
    if values is not None and len(values) != n:
      raise ValueError(f"summarize: {name} has {len(values)} entries, problem_ids has {n}")
  if n == 0:
    raise ValueError("summarize: no samples")
  groups = collections.defaultdict(list)
  for index, problem in enumerate(problem_ids.tolist()):
    groups[problem].append(index)
  samples_per_problem = sorted({len(g) for g in groups.values()})
  min_samples = samples_per_problem[0]
  if k is None:
    ks = sorted({2**i for i in range(min_samples.bit_length()) if 2**i <= min_samples}
                | {min_samples})
  else:
    ks = sorted({k} if isinstance(k, int) else set(k))
  per_problem_correct = [(len(g), int(correct[g].sum())) for g in groups.values()]
  metrics = dict(
      count=n,
      num_problems=len(groups),
      samples_per_problem=min_samples if len(samples_per_problem) == 1 else samples_per_problem,
      accuracy=float(correct.mean()),
      problem_accuracy=_mean([c / s for s, c in per_problem_correct]),
      truncation_rate=float(truncated.mean()),
      mean_length=_mean(lengths),
      median_length=_median(lengths),
      mean_length_correct=_mean(lengths[correct]),
      median_length_correct=_median(lengths[correct]),
      mean_length_incorrect=_mean(lengths[~correct]),
      median_length_incorrect=_median(lengths[~correct]),
  )
  metrics[f"avg@{min_samples}"] = metrics["problem_accuracy"]
  for kk in ks:
    if kk > min_samples:
      raise ValueError(f"summarize: pass@{kk} needs at least {kk} samples per problem, "
                       f"the smallest group has {min_samples}")
    metrics[f"pass@{kk}"] = _mean([pass_at_k(s, c, kk) for s, c in per_problem_correct])
  if answers is not None:
    votes_right = []
    for g in groups.values():
      votes = collections.Counter(answers[i] for i in g if answers[i] is not None)
      if not votes:
        votes_right.append(False)
        continue
      # The majority answer's correctness is that of any sample giving it (same verifier verdict);
      # ties go to the answer seen first.
      top = max(votes.values())
      winner = next(answers[i] for i in g if answers[i] is not None and votes[answers[i]] == top)
      votes_right.append(bool(correct[next(i for i in g if answers[i] == winner)]))
    metrics[f"maj@{min_samples}"] = _mean(votes_right)
  if texts is not None:
    markers = np.array([count_hesitation_markers(t) for t in texts], np.float64)
    total_tokens = lengths.sum()
    metrics["hesitation_per_1k_tokens"] = float(1000 * markers.sum() / total_tokens) \
        if total_tokens > 0 else float("nan")
    metrics["hesitation_response_fraction"] = float((markers > 0).mean())
    metrics["hesitation_mean_per_response"] = float(markers.mean())
  return metrics


# ------------------------------------------------------------------------------------------------
# Presentation

def _format_cell(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    if math.isnan(value):
      return "–"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def results_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                  headers: Sequence[str] | None = None) -> str:
  """A markdown table: one row per dict, one column per key (missing keys left blank)."""
  if columns is None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
  headers = list(columns) if headers is None else list(headers)
  if len(headers) != len(columns):
    raise ValueError(f"results_table: {len(headers)} headers for {len(columns)} columns")
  lines = ["| " + " | ".join(_format_cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_format_cell(row[c]) if c in row else "" for c in columns)
                 + " |")
  return "\n".join(lines)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; works without a display
  import matplotlib.pyplot as plt
  return plt


def _save(plt, figure, path):
  """PNG written under a temporary name and renamed: a kill mid-write leaves no broken image."""
  from opsd_jax import metrics
  with metrics.atomic_output(path) as tmp:
    figure.savefig(tmp, dpi=120, format="png")
  plt.close(figure)


def plot_stages(rows: Sequence[dict], path: str, label_key: str = "stage",
                metrics: Sequence[str] = ("accuracy", "mean_length"),
                titles: Sequence[str] | None = None) -> str:
  """Bars per stage (one panel per metric), e.g. accuracy and mean response length after SFT,
  RLVR and OPSD. `rows` are dicts with `label_key` and the metrics; writes a PNG to path."""
  plt = _pyplot()
  labels = [str(row[label_key]) for row in rows]
  figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
  for axis, metric, title in zip(axes[0], metrics, titles or metrics):
    values = [float(row.get(metric, float("nan"))) for row in rows]
    bars = axis.bar(labels, values, color=plt.cm.tab10.colors[:len(labels)])
    axis.bar_label(bars, fmt="%.3g", fontsize=8)
    axis.set_title(title)
  figure.tight_layout()
  _save(plt, figure, path)
  return path


def plot_curves(rows: Sequence[dict], path: str, x_key: str = "step",
                metrics: Sequence[str] = ("accuracy", "mean_length"), series_key: str | None = None,
                titles: Sequence[str] | None = None) -> str:
  """Lines over steps (one panel per metric, one line per value of `series_key`, e.g. stage or
  run name). Rows missing a metric are skipped for that panel. Writes a PNG to path."""
  plt = _pyplot()
  series = collections.defaultdict(list)
  for row in rows:
    series[row.get(series_key, "") if series_key else ""].append(row)
  figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
  for axis, metric, title in zip(axes[0], metrics, titles or metrics):
    for i, (name, points) in enumerate(series.items()):  # one colour per series in every panel
      points = sorted((p[x_key], p[metric]) for p in points if metric in p)
      if points:
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker=".", color=f"C{i % 10}", label=str(name) or None)
    axis.set_xlabel(x_key)
    axis.set_title(title)
    if series_key:
      axis.legend(fontsize=8)
  figure.tight_layout()
  _save(plt, figure, path)
  return path


def plot_scatter(rows: Sequence[dict], path: str, x_key: str = "mean_length",
                 y_key: str = "accuracy", label_key: str = "name", x_err_key: str | None = None,
                 y_err_key: str | None = None, title: str = "accuracy vs length") -> str:
  """Accuracy vs response length, one labelled point per row, with optional error bars (e.g. the
  paper grid: filter x divergence). Writes a PNG to path."""
  plt = _pyplot()
  figure, axis = plt.subplots(figsize=(5, 4))
  for row in rows:
    axis.errorbar(row[x_key], row[y_key],
                  xerr=row.get(x_err_key) if x_err_key else None,
                  yerr=row.get(y_err_key) if y_err_key else None, fmt="o", capsize=3)
    axis.annotate(str(row.get(label_key, "")), (row[x_key], row[y_key]), fontsize=8,
                  xytext=(4, 4), textcoords="offset points")
  axis.set_xlabel(x_key)
  axis.set_ylabel(y_key)
  axis.set_title(title)
  figure.tight_layout()
  _save(plt, figure, path)
  return path


# ------------------------------------------------------------------------------------------------
# Several named benchmarks per run

_PASS_KEY = re.compile(r"pass@(\d+)")
_TABLE_TAIL = (("mean_length", "mean length"), ("mean_length_correct", "length correct"),
               ("mean_length_incorrect", "length incorrect"), ("truncation_rate", "truncated"),
               ("hesitation_mean_per_response", "markers/response"),
               ("hesitation_per_1k_tokens", "markers/1k tokens"))


def _benchmark_summaries(results: dict, stages: Sequence[str], benchmarks: Sequence[str],
                         caller: str) -> list[tuple[str, str, dict]]:
  """(stage, benchmark, summary) for every pair present; stages or benchmarks not (yet) evaluated
  are left out, but at least one pair must be there."""
  found = [(stage, name, results[stage]["benchmarks"][name])
           for stage in stages if stage in results
           for name in benchmarks if name in results[stage].get("benchmarks", {})]
  if not found:
    raise ValueError(f"{caller}: results hold none of the benchmarks {list(benchmarks)} for the "
                     f"stages {list(stages)}")
  return found


def benchmark_table(results: dict, stages: Sequence[str], benchmarks: Sequence[str]) -> str:
  """A markdown table with one row per (stage, benchmark), stages in order: thinking mode,
  problems, samples, avg@n accuracy, pass@k for every k any row has (blank where a benchmark has
  fewer samples), mean length (all / correct / incorrect), truncation rate and hesitation markers.
  Pairs missing from `results` (not evaluated yet) are left out."""
  found = _benchmark_summaries(results, stages, benchmarks, "benchmark_table")
  ks = sorted({int(m.group(1)) for _, _, summary in found for key in summary
               if (m := _PASS_KEY.fullmatch(key))})
  rows = []
  for stage, name, summary in found:
    thinking = summary.get("settings", {}).get("thinking")
    row = dict(stage=stage, benchmark=name, thinking="" if thinking is None else
               ("on" if thinking else "off"), **{k: v for k, v in summary.items()
                                                 if not isinstance(v, dict)})
    rows.append(row)
  columns = ["stage", "benchmark", "thinking", "num_problems", "samples_per_problem", "accuracy",
             *(f"pass@{k}" for k in ks), *(key for key, _ in _TABLE_TAIL)]
  headers = ["stage", "benchmark", "thinking", "problems", "samples", "avg@n",
             *(f"pass@{k}" for k in ks), *(header for _, header in _TABLE_TAIL)]
  return results_table(rows, columns, headers)


def paper_summary(results: dict, stages: Sequence[str], benchmarks: Sequence[str]) -> list[dict]:
  """The paper's summary row per stage (in order; stages with none of the benchmarks left out).

  `accuracy_pct`: mean over the benchmarks of avg@n accuracy, in percent; `mean_length`: mean over
  the benchmarks of the mean response length (tokens), so each benchmark weighs the same whatever
  its size. Against the previous stage (`against`): `accuracy_change_points` (percentage points)
  and `length_change_pct` (relative length, %), and `change` in words, the way Kim & Lee state
  OPSD's compaction ("x % shorter at +-y points"). A stage missing one of the benchmarks has NaN
  means (not comparable); `benchmarks` counts the ones it has.
  """
  evaluated = dict.fromkeys(stage for stage, _, _ in
                           _benchmark_summaries(results, stages, benchmarks, "paper_summary"))
  rows, previous = [], None
  for stage in evaluated:
    present = results[stage]["benchmarks"]
    summaries = [present[name] for name in benchmarks if name in present]
    complete = len(summaries) == len(benchmarks)
    row = dict(stage=stage, benchmarks=len(summaries),
               accuracy_pct=100 * _mean([s["accuracy"] for s in summaries]) if complete
               else float("nan"),
               mean_length=_mean([s["mean_length"] for s in summaries]) if complete
               else float("nan"),
               against="", accuracy_change_points=float("nan"), length_change_pct=float("nan"),
               change="")
    if previous is not None:
      points = row["accuracy_pct"] - previous["accuracy_pct"]
      relative = 100 * (row["mean_length"] / previous["mean_length"] - 1) \
          if previous["mean_length"] > 0 else float("nan")
      row.update(against=previous["stage"], accuracy_change_points=points,
                 length_change_pct=relative)
      if not (math.isnan(points) or math.isnan(relative)):
        direction = "shorter" if relative < 0 else "longer"
        row["change"] = f"{abs(relative):.1f} % {direction} at {points:+.1f} points"
    rows.append(row)
    previous = row
  return rows


def plot_benchmarks(results: dict, stages: Sequence[str], benchmarks: Sequence[str],
                    path: str) -> str:
  """Accuracy (avg@n, %) and mean response length per stage, one line per benchmark and a dashed
  line for the mean across benchmarks (`paper_summary`'s). Stages with none of the benchmarks are
  left out; a benchmark missing in a stage is a gap. Writes a PNG to path."""
  stages = list(dict.fromkeys(stage for stage, _, _ in
                             _benchmark_summaries(results, stages, benchmarks, "plot_benchmarks")))
  summary = {row["stage"]: row for row in paper_summary(results, stages, benchmarks)}
  plt = _pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
  xs = np.arange(len(stages))
  panels = (("accuracy", 100.0, "accuracy_pct", "accuracy (avg@n, %)"),
            ("mean_length", 1.0, "mean_length", "mean response length (tokens)"))
  for axis, (key, scale, mean_key, title) in zip(axes[0], panels):
    for i, name in enumerate(benchmarks):
      ys = [scale * results[stage]["benchmarks"].get(name, {}).get(key, float("nan"))
            for stage in stages]
      axis.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
    axis.plot(xs, [summary[stage][mean_key] for stage in stages], linestyle="--", marker=".",
              color="black", label="mean")
    axis.set_xticks(xs, stages)
    axis.set_title(title)
  axes[0][0].legend(fontsize=8)
  figure.tight_layout()
  _save(plt, figure, path)
  return path
