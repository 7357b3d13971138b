"""The paper's grid: OPSD branches from one checkpoint, one per (rollout filter, divergence,
student thinking mode, seed), each evaluated like a stage, then a report of mean ± std across
seeds.

Arms: every grid.rollout_filters x grid.divergences, except split_direction, which runs once per
seed (it uses rkl on correct and fkl on incorrect rollouts whatever opsd.divergence says, so
one run per divergence would repeat the same computation; it is labelled "rkl+fkl"). Then each
grid.thinking_off_arms entry ("rollout_filter/divergence"): a thinking-off student with a
thinking-on teacher (Paper A), evaluated with thinking off and compared with the base checkpoint
evaluated with thinking off (results["grid_base_thinking_off"]). Branches run seed-major, so an
unfinished grid already holds every arm at its first seeds.

Each branch lives in <workdir>/grid/<name>/ with its own checkpoints and metrics.jsonl, so it
resumes on its own; a finished branch is recorded in results.json["grid"] and skipped on rerun.
Writes grid.md (the table) and grid.png (accuracy against response length, error bars = std);
`python -m opsd_jax.grid WORKDIR` rewrites both from WORKDIR/results.json (e.g. while the grid
is still running, from the branches finished so far).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys

import numpy as np

from opsd_jax import benchmarks, evaluate, metrics
from opsd_jax import results as results_lib
from opsd_jax.train import opsd

SPLIT_LABEL = "rkl+fkl"  # split_direction: reverse KL on correct, forward KL on incorrect rollouts


@dataclasses.dataclass(frozen=True)
class Branch:
  rollout_filter: str
  divergence: str        # the value set as opsd.divergence
  seed: int
  thinking: bool = True  # the student's thinking mode (the teacher's is always on)

  @property
  def divergence_label(self) -> str:
    return SPLIT_LABEL if self.rollout_filter == "split_direction" else self.divergence

  @property
  def arm(self) -> str:
    return (f"{self.rollout_filter} / {self.divergence_label}"
            + ("" if self.thinking else " / thinking off"))

  @property
  def name(self) -> str:
    prefix = "" if self.thinking else "thinking_off-"
    return f"{prefix}{self.rollout_filter}-{self.divergence_label}-seed{self.seed}"


def branches(grid_cfg) -> list[Branch]:
  """Every branch of the grid, seed-major; split_direction once per seed."""
  out = []
  for seed in grid_cfg.seeds:
    for rollout_filter in grid_cfg.rollout_filters:
      divergences = grid_cfg.divergences
      if rollout_filter == "split_direction":
        divergences = divergences[:1]
      out += [Branch(rollout_filter, d, seed) for d in divergences]
    for arm in grid_cfg.thinking_off_arms:
      rollout_filter, _, divergence = arm.partition("/")
      out.append(Branch(rollout_filter, divergence, seed, thinking=False))
  return out


def _branch_config(cfg, b: Branch):
  branch = cfg.copy_and_resolve_references()
  branch.unlock()
  branch.opsd.rollout_filter = b.rollout_filter
  branch.opsd.divergence = b.divergence
  branch.opsd.student_thinking = b.thinking
  if not b.thinking:
    branch.opsd.teacher_thinking = True
  branch.seed = cfg.seed + b.seed
  return branch


def run(run_, base_params, results):
  done = results.setdefault("grid", {})
  todo = branches(run_.cfg.grid)
  if any(not b.thinking for b in todo) and "grid_base_thinking_off" not in results:
    results["grid_base_thinking_off"] = benchmarks.evaluate_params(
        run_, base_params, "base (thinking off)", thinking=False)
    results_lib.save(run_.workdir, results)
    r = results["grid_base_thinking_off"]
    print(f"[grid base, thinking off] accuracy={r['accuracy']:.3f} "
          f"mean_length={r['mean_length']:.1f}", flush=True)
  for b in todo:
    if b.name in done:
      continue
    workdir = os.path.join(run_.workdir, "grid", b.name)
    logger = metrics.Logger(workdir)
    branch = dataclasses.replace(run_, cfg=_branch_config(run_.cfg, b), workdir=workdir,
                                 logger=logger)
    try:
      params = opsd.train(branch, base_params)
      r = benchmarks.evaluate_params(branch, params, b.name, thinking=b.thinking)
      r.update(rollout_filter=b.rollout_filter, divergence=b.divergence_label, seed=b.seed,
               thinking=b.thinking,
               trained_tokens=int(sum(x.get("opsd/trained_tokens", 0)
                                      for x in logger.records("opsd"))))
    finally:
      logger.close()
    done[b.name] = r
    results_lib.save(run_.workdir, results)
    print(f"[grid {b.name}] accuracy={r['accuracy']:.3f} mean_length={r['mean_length']:.1f} "
          f"trained_tokens={r['trained_tokens']}", flush=True)
  report(run_.workdir, results)


_COLUMNS = ("accuracy", "mean_length", "hesitation_mean_per_response", "trained_tokens")


def summarize(branch_results: dict) -> list[dict]:
  """Mean and std (population, ddof 0) across seeds of each arm, in first-seen order."""
  arms = collections.defaultdict(list)
  for r in branch_results.values():
    arms[(r["rollout_filter"], r["divergence"], r.get("thinking", True))].append(r)
  rows = []
  for (rollout_filter, divergence, thinking), rs in arms.items():
    row = dict(name=f"{rollout_filter} / {divergence}" + ("" if thinking else " / thinking off"),
               thinking=thinking, seeds=len(rs))
    for key in _COLUMNS:
      values = np.asarray([r[key] for r in rs], np.float64)
      row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
    rows.append(row)
  return rows


def base_rows(results) -> list[dict]:
  """The checkpoint every branch starts from, evaluated in each student mode the grid uses."""
  base = results.get("rlvr") or results.get("sft") or results.get("init")
  rows = []
  for r, name, thinking in ((base, "base", True),
                            (results.get("grid_base_thinking_off"), "base / thinking off", False)):
    if r:
      rows.append(dict(name=name, thinking=thinking, seeds="–", trained_tokens=0,
                       **{k: r[k] for k in _COLUMNS if k in r}))
  return rows


def report(workdir, results):
  rows = summarize(results["grid"])
  bases = base_rows(results)
  table_rows = [dict(arm=r["name"], seeds=r["seeds"],
                     **{k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in _COLUMNS}) for r in rows]
  table_rows = [dict(arm=b["name"], seeds=b["seeds"], **{k: f"{b[k]:.3f}" for k in _COLUMNS})
                for b in bases] + table_rows
  text = ("# OPSD grid\n\nEach arm: mean ± std (across seeds, ddof 0) of held-out accuracy, "
          "mean response length (tokens), hesitation markers per response and trained tokens; "
          "every branch starts from the same checkpoint (the base rows: it evaluated once, in "
          "each student thinking mode). Thinking-off arms are evaluated with thinking off.\n\n"
          + evaluate.results_table(table_rows, ["arm", "seeds", *_COLUMNS]) + "\n")
  metrics.write_text_atomic(os.path.join(workdir, "grid.md"), text)
  evaluate.plot_scatter(bases + rows, os.path.join(workdir, "grid.png"), x_key="mean_length",
                        y_key="accuracy", label_key="name", x_err_key="mean_length_std",
                        y_err_key="accuracy_std",
                        title="OPSD grid: accuracy vs response length")
  print(text, flush=True)


def main(argv):
  if len(argv) != 1:
    raise SystemExit("usage: python -m opsd_jax.grid WORKDIR  (rewrites WORKDIR/grid.md and "
                     "grid.png from WORKDIR/results.json)")
  path = os.path.join(argv[0], "results.json")
  if not os.path.isfile(path):
    raise SystemExit(f"error: no results at {path!r}")
  with open(path) as f:
    results = json.load(f)
  if not results.get("grid"):
    raise SystemExit(f"error: {path!r} holds no finished grid branch yet")
  report(argv[0], results)


if __name__ == "__main__":
  main(sys.argv[1:])
