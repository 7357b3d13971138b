"""The paper's grid: OPSD branches from one checkpoint, one per (rollout filter, divergence,
seed), each evaluated like a stage, then a report of mean ± std across seeds.

Each branch lives in <workdir>/grid/<name>/ with its own checkpoints and metrics.jsonl, so it
resumes on its own; a finished branch is recorded in results.json["grid"] and skipped on rerun.
Writes grid.md (the table) and grid.png (accuracy against response length, error bars = std).
"""
from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np

from opsd_jax import evaluate, metrics


def _branch_config(cfg, rollout_filter, divergence, seed):
  branch = cfg.copy_and_resolve_references()
  branch.unlock()
  branch.opsd.rollout_filter = rollout_filter
  branch.opsd.divergence = divergence
  branch.seed = cfg.seed + seed
  return branch


def run(run_, base_params, results):
  from opsd_jax import pipeline
  from opsd_jax.train import opsd
  g = run_.cfg.grid
  done = results.setdefault("grid", {})
  for rollout_filter in g.rollout_filters:
    for divergence in g.divergences:
      for seed in g.seeds:
        name = f"{rollout_filter}-{divergence}-seed{seed}"
        if name in done:
          continue
        workdir = os.path.join(run_.workdir, "grid", name)
        logger = metrics.Logger(workdir)
        branch = dataclasses.replace(run_, cfg=_branch_config(run_.cfg, rollout_filter,
                                                              divergence, seed),
                                     workdir=workdir, logger=logger)
        try:
          params = opsd.train(branch, base_params)
          r = pipeline.evaluate_params(branch, params, name)
          r.update(rollout_filter=rollout_filter, divergence=divergence, seed=seed,
                   trained_tokens=int(sum(x.get("opsd/trained_tokens", 0)
                                          for x in logger.records("opsd"))))
        finally:
          logger.close()
        done[name] = r
        pipeline.save_results(run_, results)
        print(f"[grid {name}] accuracy={r['accuracy']:.3f} mean_length={r['mean_length']:.1f} "
              f"trained_tokens={r['trained_tokens']}", flush=True)
  report(run_.workdir, results)


_COLUMNS = ("accuracy", "mean_length", "hesitation_mean_per_response", "trained_tokens")


def summarize(branches: dict) -> list[dict]:
  """Mean and std across seeds of each (rollout filter, divergence) arm."""
  arms = collections.defaultdict(list)
  for r in branches.values():
    arms[(r["rollout_filter"], r["divergence"])].append(r)
  rows = []
  for (rollout_filter, divergence), rs in arms.items():
    row = dict(name=f"{rollout_filter} / {divergence}", seeds=len(rs))
    for key in _COLUMNS:
      values = np.asarray([r[key] for r in rs], np.float64)
      row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
    rows.append(row)
  return rows


def report(workdir, results):
  rows = summarize(results["grid"])
  table_rows = [dict(arm=r["name"], seeds=r["seeds"],
                     **{k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in _COLUMNS}) for r in rows]
  base = results.get("rlvr") or results.get("sft") or {}
  text = ("# OPSD grid\n\nEach arm: mean ± std across seeds of held-out accuracy, mean response "
          "length (tokens), hesitation markers per response and trained tokens; every branch "
          "starts from the same checkpoint"
          + (f" (accuracy {base['accuracy']:.3f}, length {base['mean_length']:.1f})"
             if base else "") + ".\n\n"
          + evaluate.results_table(table_rows, ["arm", "seeds", *_COLUMNS]) + "\n")
  metrics.write_text_atomic(os.path.join(workdir, "grid.md"), text)
  evaluate.plot_scatter(rows, os.path.join(workdir, "grid.png"), x_key="mean_length",
                        y_key="accuracy", label_key="name", x_err_key="mean_length_std",
                        y_err_key="accuracy_std")
  print(text, flush=True)
