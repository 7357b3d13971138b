"""The OPSD grid: branches from one checkpoint, per-arm mean ± std, the report and its plot."""
import json
import os

import numpy as np
import pytest

from opsd_jax import grid
from pipeline_helpers import REPO, TINY, run

GRID = os.path.join(REPO, "experiments", "toy_paper_grid.py")


def test_summarize_is_mean_and_std_across_seeds():
  rng = np.random.default_rng(0)
  branches, expected = {}, {}
  for arm in [("all", "rkl"), ("correct_only", "fkl")]:
    values = rng.random((3, 4)) * [1, 100, 3, 1000]
    expected[arm] = values
    for seed, v in enumerate(values):
      branches[f"{arm}-{seed}"] = dict(rollout_filter=arm[0], divergence=arm[1], seed=seed,
                                       **dict(zip(grid._COLUMNS, v)))
  rows = {r["name"]: r for r in grid.summarize(branches)}
  for (f, d), values in expected.items():
    row = rows[f"{f} / {d}"]
    assert row["seeds"] == 3
    for i, key in enumerate(grid._COLUMNS):
      assert row[key] == pytest.approx(values[:, i].mean())
      assert row[f"{key}_std"] == pytest.approx(values[:, i].std())


def test_grid_branches_share_the_base_and_report(tmp_path):
  workdir = tmp_path / "grid"
  args = [*TINY, "--config.rlvr.steps=1", "--config.opsd.steps=2",
          "--config.grid.rollout_filters=('all','correct_only')",
          "--config.grid.divergences=('rkl',)", "--config.grid.seeds=(0,1)"]
  proc, _ = run(GRID, workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["grid"]) == ["all-rkl-seed0", "all-rkl-seed1", "correct_only-rkl-seed0",
                                     "correct_only-rkl-seed1"]
  assert "opsd" not in results  # the base chain stops at RLVR; OPSD runs only as branches

  def first_step(name):
    path = workdir / "grid" / name / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()][0]

  for seed in (0, 1):  # same checkpoint and seed => the same first rollouts in both arms
    a, c = first_step(f"all-rkl-seed{seed}"), first_step(f"correct_only-rkl-seed{seed}")
    assert a["accuracy"] == c["accuracy"]
    assert a["completions/mean_length"] == c["completions/mean_length"]
    assert a["opsd/selected_rows"] == 8 and c["opsd/selected_rows"] == round(8 * c["accuracy"])
  table = (workdir / "grid.md").read_text()
  assert "all / rkl" in table and "correct_only / rkl" in table
  assert (workdir / "grid.png").stat().st_size > 1000
  rerun, _ = run(GRID, workdir, *args)  # finished branches are skipped
  assert rerun.returncode == 0 and "[grid " not in rerun.stdout
