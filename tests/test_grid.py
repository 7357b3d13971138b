"""The OPSD grid: branches from one checkpoint (split_direction once, thinking-off arms), per-arm
mean ± std, the thinking-off evaluation, the report and its plot."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from opsd_jax import grid, model, parallel, pipeline, prompts, rollouts
from pipeline_helpers import REPO, TINY, run

GRID = os.path.join(REPO, "experiments", "toy_paper_grid.py")


def test_summarize_is_mean_and_std_across_seeds():
  rng = np.random.default_rng(0)
  branches, expected = {}, {}
  for arm in [("all", "rkl", True), ("correct_only", "fkl", True), ("all", "fkl", False)]:
    values = rng.random((3, 4)) * [1, 100, 3, 1000]
    expected[arm] = values
    for seed, v in enumerate(values):
      branches[f"{arm}-{seed}"] = dict(rollout_filter=arm[0], divergence=arm[1], seed=seed,
                                       thinking=arm[2], **dict(zip(grid._COLUMNS, v)))
  rows = {r["name"]: r for r in grid.summarize(branches)}
  assert set(rows) == {"all / rkl", "correct_only / fkl", "all / fkl / thinking off"}
  for (f, d, thinking), values in expected.items():
    row = rows[f"{f} / {d}" + ("" if thinking else " / thinking off")]
    assert row["seeds"] == 3 and row["thinking"] == thinking
    for i, key in enumerate(grid._COLUMNS):
      assert row[key] == pytest.approx(values[:, i].mean())
      assert row[f"{key}_std"] == pytest.approx(np.sqrt(np.mean((values[:, i]
                                                                 - values[:, i].mean()) ** 2)))


def test_branches_run_split_direction_once_and_the_thinking_off_arms():
  g = ml_collections.ConfigDict(dict(
      rollout_filters=("all", "split_direction", "incorrect_only"), divergences=("fkl", "rkl"),
      seeds=(0, 1, 2), thinking_off_arms=("all/fkl", "correct_only/rkl")))
  got = grid.branches(g)
  # brute force: the full product, minus split_direction's duplicate divergence, plus the arms
  want = {(f, d, s, True) for f, d, s in itertools.product(g.rollout_filters, g.divergences,
                                                           g.seeds)
          if not (f == "split_direction" and d == "rkl")}
  want |= {(f, d, s, False) for s in g.seeds for f, d in [("all", "fkl"), ("correct_only", "rkl")]}
  assert {(b.rollout_filter, b.divergence, b.seed, b.thinking) for b in got} == want
  assert len(got) == len(want) == 3 * (2 + 1 + 2 + 2)
  assert len({b.name for b in got}) == len(got)  # one workdir per branch
  assert [b.seed for b in got] == sorted(b.seed for b in got)  # seed-major
  split = [b for b in got if b.rollout_filter == "split_direction"]
  assert {b.divergence_label for b in split} == {"rkl+fkl"}
  cfg = _branch_cfg(got, "thinking_off-correct_only-rkl-seed2")
  assert (cfg.opsd.rollout_filter, cfg.opsd.divergence) == ("correct_only", "rkl")
  assert not cfg.opsd.student_thinking and cfg.opsd.teacher_thinking and cfg.seed == 2 + 5
  cfg = _branch_cfg(got, "all-fkl-seed1")
  assert cfg.opsd.student_thinking and cfg.seed == 1 + 5


def _branch_cfg(branches, name):
  from opsd_jax import config
  base = config.default_config()
  base.seed = 5
  base.opsd.teacher_thinking = False
  return grid._branch_config(base, next(b for b in branches if b.name == name))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  sys_path = __import__("sys").path
  sys_path.insert(0, REPO)
  from experiments import toy_paper_grid
  cfg = toy_paper_grid.get_config()
  cfg.model.update(dict(d_model=64, n_layers=2, head_dim=16, mlp_dim=128))
  cfg.data.update(dict(num_train=200, num_test=4))
  cfg.mesh.data = -1  # conftest fakes 8 CPU devices
  run_ = pipeline.setup(cfg, str(tmp_path_factory.mktemp("grid_eval")))
  yield run_
  run_.grader.close()
  run_.logger.close()


def _greedy(forward, prompt, steps, eos, width):
  """Brute-force greedy decoding: a full forward over the whole sequence at every step (right
  padding to one width keeps one compiled shape; causal attention ignores what follows)."""
  ids = list(prompt)
  for _ in range(steps):
    logits = forward(jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    if ids[-1] == eos:
      break
  return ids[len(prompt):]


def test_thinking_off_rollouts_continue_the_thinking_off_prompt(tiny_run):
  r = tiny_run
  params = parallel.init_params(r.model_cfg, jax.random.key(3), r.mesh)
  problems, steps = r.test[:3], 8
  ro = rollouts.sample_and_grade(r.sampler, params, problems, num_samples=1, temperature=0.0, top_p=1.0,
                                 top_k=0, max_new_tokens=steps, rng=jax.random.key(0),
                                 thinking=False)
  eos = r.tok.eos_ids[0]
  forward = jax.jit(lambda ids: model.forward(r.model_cfg, params, ids))
  differs = 0
  for i, p in enumerate(problems):
    prompt = prompts.student(r.tok, r.template, p["question"], thinking=False)
    assert ro.prompt_ids[i] == prompt and r.tok.decode(prompt).endswith("<think></think>")
    want = _greedy(forward, prompt, steps, eos, width=128)
    assert ro.tokens[i, :ro.lengths[i]].tolist() == want
    on = _greedy(forward, prompts.student(r.tok, r.template, p["question"]), steps, eos, 128)
    differs += on != want
  assert differs  # the check has power: the two modes' prompts lead to other tokens


@pytest.mark.slow  # two CLI runs (SFT, RLVR, 4 branches, 3 evaluations): ~5 min on a loaded 2-core CPU
def test_grid_branches_share_the_base_and_report(tmp_path):
  workdir = tmp_path / "grid"
  args = [*TINY, "--config.rlvr.steps=1", "--config.opsd.steps=2",
          "--config.grid.rollout_filters=('correct_only','split_direction')",
          "--config.grid.divergences=('rkl','fkl')", "--config.grid.seeds=(0,)",
          "--config.grid.thinking_off_arms=('all/fkl',)"]
  proc, _ = run(GRID, workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["grid"]) == sorted(
      f"{arm}-seed0" for arm in (
          "correct_only-rkl", "correct_only-fkl", "split_direction-rkl+fkl",
          "thinking_off-all-fkl"))
  assert "opsd" not in results  # the base chain stops at RLVR; OPSD runs only as branches
  base_off = results["grid_base_thinking_off"]
  assert base_off["settings"]["thinking"] is False and results["rlvr"]["settings"]["thinking"]
  for name, r in results["grid"].items():
    assert r["settings"]["thinking"] == r["thinking"] == (not name.startswith("thinking_off"))

  def first_step(name):
    path = workdir / "grid" / name / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()][0]

  # same checkpoint and seed => the same first rollouts in every thinking-on arm
  steps = {a: first_step(f"{a}-seed0")
           for a in ("correct_only-rkl", "correct_only-fkl", "split_direction-rkl+fkl")}
  c = steps["correct_only-rkl"]
  for other in steps.values():
    assert other["accuracy"] == c["accuracy"]
    assert other["completions/mean_length"] == c["completions/mean_length"]
  assert steps["split_direction-rkl+fkl"]["opsd/selected_rows"] == 8
  assert c["opsd/selected_rows"] == round(8 * c["accuracy"])
  table = (workdir / "grid.md").read_text()
  for arm in ("| base |", "| base / thinking off |", "correct_only / rkl", "correct_only / fkl",
              "split_direction / rkl+fkl", "all / fkl / thinking off"):
    assert arm in table
  assert (workdir / "grid.png").stat().st_size > 1000
  (workdir / "grid.md").unlink()
  grid.main([str(workdir)])  # the report alone, from results.json
  assert (workdir / "grid.md").read_text() == table
  rerun, _ = run(GRID, workdir, *args)  # finished branches are skipped
  assert rerun.returncode == 0 and "[grid " not in rerun.stdout
