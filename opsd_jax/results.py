"""results.json (what each evaluation measured, what the data lost at load) and the reports
made from it: results.md, stages.png, benchmarks.png, curves.png. The pipeline and the grid both
write through here; only process 0 writes (multi-host)."""
from __future__ import annotations

import json
import os
from typing import Any

from opsd_jax import evaluate, metrics, parallel


class ResultsError(ValueError):
  """An unreadable results.json; the message names the file."""


def _path(workdir):
  return os.path.join(workdir, "results.json")


def load(workdir) -> dict[str, Any]:
  """results.json of a workdir ({} when there is none yet)."""
  path = _path(workdir)
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ResultsError(f"{path} is not valid JSON ({e}); delete it to re-evaluate the "
                          "stages") from e
  return {}


def save(workdir, results):
  """Written whole to a temporary name and renamed: a crash never leaves half a file."""
  if parallel.is_primary():
    metrics.write_text_atomic(_path(workdir), json.dumps(results, indent=2))


def say(text):
  """Progress lines come from process 0 only (multi-host)."""
  if parallel.is_primary():
    print(text, flush=True)


def print_eval(stage, r):
  """One line per evaluation, from process 0."""
  say(f"[eval {stage}] accuracy={r['accuracy']:.3f} mean_length={r['mean_length']:.1f} "
      f"(correct {r['mean_length_correct']:.1f}, incorrect {r['mean_length_incorrect']:.1f}) "
      f"truncated={r['truncation_rate']:.3f} "
      f"markers/response={r['hesitation_mean_per_response']:.2f}")


def report(run, results: dict[str, Any]):
  """results.md (the stages, each benchmark, the rows dropped at load) and plots, from
  results.json and metrics.jsonl."""
  order = ["init"] + [s for s in run.cfg.stages if s in results and s != "eval"]
  rows = [dict(stage=s, **{k: v for k, v in results[s].items() if not isinstance(v, dict)})
          for s in order if s in results]
  columns = ["stage", "accuracy", "mean_length", "mean_length_correct", "mean_length_incorrect",
             "truncation_rate", "hesitation_mean_per_response", "train_seconds"]
  table = evaluate.results_table(rows, columns)
  settings = results[order[-1]]["settings"]
  source = f" from {run.cfg.init_from}" if run.cfg.init_from else ""
  text = (f"# {run.cfg.name}\n\nHeld-out evaluation{source} after each stage, mean over the "
          f"benchmarks ({settings}).\n\n{table}\n")
  names = list(run.eval_sets)
  if len(names) > 1 or run.cfg.data.kind != "toy":
    summary = evaluate.paper_summary(results, order, names)
    text += ("\n## Each benchmark\n\n" + evaluate.benchmark_table(results, order, names)
             + "\n\n## Summary (mean over benchmarks, change against the stage before)\n\n"
             + evaluate.results_table(summary) + "\n")
    evaluate.plot_benchmarks(results, order, names, os.path.join(run.workdir, "benchmarks.png"))
  if run.data_report:
    text += "\n## Data\n\n" + "".join(
        f"- {name}: {r['fit']['kept']} of {r['fit']['rows']} rows used"
        + (f"; prompts too long: {r['fit']['dropped']}" if r["fit"]["dropped"] else "")
        + (f"; skipped at load: {r['reasons']}" if r.get("reasons") else "") + "\n"
        for name, r in run.data_report.items())
  metrics.write_text_atomic(os.path.join(run.workdir, "results.md"), text)
  evaluate.plot_stages(rows, os.path.join(run.workdir, "stages.png"))
  evaluate.plot_curves(run.logger.records(), os.path.join(run.workdir, "curves.png"),
                       metrics=("loss", "accuracy", "completions/mean_length"),
                       series_key="stage",
                       titles=("train loss", "rollout accuracy", "rollout length (tokens)"))
  print(text, flush=True)
