"""`python -m opsd_jax.error_kinds WORKDIR`: what kind of wrong each evaluation's answers are, for
a run on the strategy toy family (data.family=strategy).

Every evaluation of the run (its stages, the grid's base rows and branches) is read back from its
sample files, each answer classified by `toy_strategy.classify_error` (right, wrong_order,
misread, other, no_answer), and the shares written to WORKDIR/error_kinds.md and .json; grid
branches are averaged over their seeds per arm. The test problems are generated again from the
run's config.json (seed, num_train, num_test), exactly as the run generated them.
"""
from __future__ import annotations

import collections
import json
import os
import sys

from opsd_jax import benchmarks, evaluate, grid, metrics
from opsd_jax.data import toy_strategy

KINDS = ("right", "wrong_order", "misread", "other", "no_answer")
_SINGLE = (("sft", "sft (thinking on)"), ("grid_sft_thinking_off", "sft / thinking off"),
           ("rlvr", "rlvr (thinking on)"), ("grid_base_thinking_off", "rlvr / thinking off"),
           ("opsd", "opsd"))


def shares(problems, workdir, result) -> dict[str, float] | None:
  """Share of each kind among one evaluation's answers (None without its sample file)."""
  samples = benchmarks.read_samples(workdir, result["label"], next(iter(result["benchmarks"])))
  if not samples or not samples["problem_ids"]:
    return None
  counts = collections.Counter(toy_strategy.classify_error(problems[p], a)
                               for p, a in zip(samples["problem_ids"], samples["answers"]))
  n = sum(counts.values())
  return {k: counts[k] / n for k in KINDS}


def table(workdir) -> list[dict]:
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  if cfg["data"].get("family") != "strategy":
    raise SystemExit(f"error: {workdir} is not a strategy-family run (data.family="
                     f"{cfg['data'].get('family')!r})")
  _, problems = toy_strategy.make_splits(cfg["seed"], cfg["data"]["num_train"],
                                         cfg["data"]["num_test"])
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  rows = []
  for key, name in _SINGLE:
    if key in results and (s := shares(problems, workdir, results[key])):
      rows.append(dict(evaluation=name, seeds=1, **s))
  arms = collections.defaultdict(list)
  for branch, r in results.get("grid", {}).items():
    s = shares(problems, os.path.join(workdir, "grid", branch), r)
    if s:
      arms[grid.arm_name(r["rollout_filter"], r["divergence"], r.get("thinking", True),
                         r.get("horizon", 1))].append(s)
  for arm, per_seed in arms.items():
    rows.append(dict(evaluation=arm, seeds=len(per_seed),
                     **{k: sum(s[k] for s in per_seed) / len(per_seed) for k in KINDS}))
  return rows


def main(argv):
  if len(argv) != 1:
    raise SystemExit("usage: python -m opsd_jax.error_kinds WORKDIR")
  rows = table(argv[0])
  metrics.write_text_atomic(os.path.join(argv[0], "error_kinds.json"), json.dumps(rows, indent=1))
  text = ("# Kinds of answers (share of all answers; grid arms: mean over seeds)\n\n"
          + evaluate.results_table([{k: (f"{v:.3f}" if isinstance(v, float) else v)
                                     for k, v in r.items()} for r in rows],
                                   ["evaluation", "seeds", *KINDS]) + "\n")
  metrics.write_text_atomic(os.path.join(argv[0], "error_kinds.md"), text)
  print(text)


if __name__ == "__main__":
  main(sys.argv[1:])
