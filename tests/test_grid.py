"""The OPSD grid: branches from one checkpoint (divergence arms, split_direction once,
thinking-off and long-horizon arms), the two-level bootstrap, the claims' verdicts, the
thinking-off evaluations, the report and its plots."""
import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import experiment, grid, grid_report, model, parallel, pipeline, prompts, rollouts
from opsd_jax import stats
from pipeline_helpers import REPO, TINY, run

GRID = os.path.join(REPO, "experiments", "toy_paper_grid.py")


# --------------------------------------------------------------------------------------------
# The two-level bootstrap (stats.py)
# --------------------------------------------------------------------------------------------


def _synthetic(seeds=3, problems=(40, 25), seed=0):
  """Per benchmark: base per-problem values [P] and an arm's [seeds, P] near them."""
  rng = np.random.default_rng(seed)
  base = [rng.random(p) for p in problems]
  arm = [b + 0.05 * rng.standard_normal((seeds, len(b))) for b in base]
  return arm, base


def test_bootstrap_is_deterministic_and_its_interval_holds_the_value():
  arm, base = _synthetic()
  a = stats.hierarchical_bootstrap(arm, base, samples=500)
  assert a == stats.hierarchical_bootstrap(arm, base, samples=500)  # fixed seed
  assert a["value"] == pytest.approx(np.mean([x.mean() for x in arm]))
  for value, ci in (("value", "ci"), ("diff", "diff_ci"), ("diff_pct", "diff_pct_ci")):
    assert a[ci][0] < a[value] < a[ci][1]
  assert a["diff"] == pytest.approx(a["value"] - np.mean([b.mean() for b in base]))


def test_an_arm_identical_to_the_base_differs_by_exactly_zero():
  _, base = _synthetic()
  arm = [np.stack([b] * 3) for b in base]
  a = stats.hierarchical_bootstrap(arm, base, samples=300)
  assert a["diff"] == 0 and a["diff_ci"] == (0.0, 0.0)
  assert a["diff_pct"] == 0 and a["diff_pct_ci"] == (0.0, 0.0)
  assert a["ci"][0] < a["value"] < a["ci"][1]  # the problems still vary


def test_a_known_shift_lies_inside_the_paired_interval():
  rng = np.random.default_rng(1)
  base = [rng.random(200)]
  noise = 0.1 * rng.standard_normal((4, 200))
  noise -= noise.mean()  # the seeds' noise averages to zero: the arm is base + 0.3 exactly
  a = stats.hierarchical_bootstrap([base[0] + 0.3 + noise], base, samples=1000)
  assert a["diff"] == pytest.approx(0.3)
  lo, hi = a["diff_ci"]
  assert lo < 0.3 < hi and hi - lo < 0.1
  # paired: the interval of the difference is far narrower than the arm's own
  assert hi - lo < (a["ci"][1] - a["ci"][0]) / 2
  assert a["diff_pct_ci"][0] < 100 * 0.3 / base[0].mean() < a["diff_pct_ci"][1]


def test_one_seed_leaves_an_interval_over_problems_alone():
  arm, base = _synthetic(seeds=1)
  a = stats.hierarchical_bootstrap(arm, base, samples=400)
  b = stats.hierarchical_bootstrap([x[0] for x in arm], base, samples=400)  # [P] works too
  assert a == b and a["ci"][0] < a["value"] < a["ci"][1]
  assert a["diff_ci"][0] < a["diff"] < a["diff_ci"][1]
  # seeds that disagree widen the interval: the seed level counts
  spread = [np.vstack([x[0] - 0.2, x[0], x[0] + 0.2]) for x in arm]
  wide = stats.hierarchical_bootstrap(spread, base, samples=400)
  assert wide["diff_ci"][1] - wide["diff_ci"][0] > 2 * (a["diff_ci"][1] - a["diff_ci"][0])


def test_the_problem_draw_is_shared_by_arms_with_any_seed_count():
  w = stats.problem_weights([30, 7], samples=50)
  assert [x.shape for x in w] == [(50, 30), (50, 7)]
  assert np.allclose(w[0].sum(1), 1) and np.allclose(w[1].sum(1), 1)
  again = stats.problem_weights([30, 7], samples=50)
  assert all((x == y).all() for x, y in zip(w, again))
  s = stats.seed_weights(1, samples=50)
  assert (s == 1).all()  # one seed: the seed level is degenerate


# --------------------------------------------------------------------------------------------
# The claims' verdicts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("claim, row, want", [
    ("correct_only", dict(length_diff_pct_ci=(-30, -20), accuracy_diff_points_ci=(-1.5, 2)),
     "yes"),
    ("correct_only", dict(length_diff_pct_ci=(-30, -20), accuracy_diff_points_ci=(-2.5, 2)),
     "not shown"),  # a loss beyond 2 points is not excluded
    ("correct_only", dict(length_diff_pct_ci=(-3, 1), accuracy_diff_points_ci=(0, 1)),
     "not shown"),  # shorter not shown
    ("correct_only", dict(length_diff_pct_ci=(-30, -20), accuracy_diff_points_ci=(-6, -3)),
     "no"),  # loses more than 2 points
    ("correct_only", dict(length_diff_pct_ci=(0, 0), accuracy_diff_points_ci=(0, 0)), "no"),
    ("correct_only", dict(length_diff_pct_ci=None, accuracy_diff_points_ci=(0, 1)), "not shown"),
    ("incorrect_only", dict(accuracy_diff_points_ci=(-10, -3)), "yes"),
    ("incorrect_only", dict(accuracy_diff_points_ci=(-3, 0.5)), "not shown"),
    ("incorrect_only", dict(accuracy_diff_points_ci=(1, 4)), "no"),
    ("thinking_off", dict(accuracy_diff_points_ci=(0.5, 4)), "yes"),
    ("thinking_off", dict(accuracy_diff_points_ci=(-0.5, 4)), "not shown"),
    ("thinking_off", dict(accuracy_diff_points_ci=(-4, -1)), "no"),
    ("thinking_off", dict(accuracy_diff_points_ci=(float("nan"), 1)), "not shown"),
])
def test_verdict(claim, row, want):
  assert grid_report.verdict(grid_report.CLAIMS[claim], row) == want


def test_claim_of_an_arm():
  assert grid_report.claim_key("correct_only", True) == "correct_only"
  assert grid_report.claim_key("incorrect_only", True) == "incorrect_only"
  claim_key = grid_report.claim_key
  assert claim_key("correct_only", False) == claim_key("all", False) == "thinking_off"
  assert claim_key("all", True) is None and claim_key("split_direction", True) is None


# --------------------------------------------------------------------------------------------
# Branches
# --------------------------------------------------------------------------------------------


def _grid_cfg(**kw):
  from opsd_jax import config
  g = config.default_config().grid
  g.update(kw)
  return g


def test_branches_run_split_direction_once_and_the_thinking_off_arms():
  g = _grid_cfg(
      rollout_filters=("all", "split_direction", "incorrect_only"), divergences=("fkl", "rkl"),
      seeds=(0, 1, 2), thinking_off_arms=("all/fkl", "correct_only/rkl"))
  got = grid.branches(g)
  # brute force: the full product, minus split_direction's duplicate divergence, plus the arms
  want = {(f, d, s, True) for f, d, s in itertools.product(g.rollout_filters, g.divergences,
                                                           g.seeds)
          if not (f == "split_direction" and d == "fkl")}
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


def test_divergence_arms_set_their_opsd_settings():
  g = _grid_cfg(rollout_filters=("correct_only", "split_direction"),
                divergences=tuple(grid.ARMS), seeds=(0,), tau=0.07)
  got = grid.branches(g)
  assert [b.name for b in got] == [
      "correct_only-rkl-seed0", "correct_only-fkl-seed0", "correct_only-fkl_tau-seed0",
      "correct_only-rkl_sampled-seed0", "split_direction-rkl+fkl-seed0"]
  settings = {b.name: _branch_cfg(got, b.name, grid_cfg=g, clip=0.5).opsd for b in got}
  want = {"correct_only-rkl-seed0": ("rkl", "full", 0.5),  # the run's clip as configured
          "correct_only-fkl-seed0": ("fkl", "full", 0.5),
          "correct_only-fkl_tau-seed0": ("fkl", "full", 0.07),
          "correct_only-rkl_sampled-seed0": ("rkl", "sampled", -1.0),
          "split_direction-rkl+fkl-seed0": ("rkl", "full", 0.5)}
  for name, (divergence, estimator, clip) in want.items():
    o = settings[name]
    assert (o.divergence, o.estimator, o.clip) == (divergence, estimator, clip), name
    assert o.steps == 40 and o.rollout_filter == name.split("-")[0]
  for b in got:  # names are path parts, and the evaluation labels stay readable
    assert "/" not in b.name and " " not in b.name


def test_long_horizon_branches_run_factor_times_the_steps_last():
  g = _grid_cfg(rollout_filters=("correct_only",), divergences=("rkl", "fkl"), seeds=(0, 1, 2),
                long_horizon_arms=("correct_only/rkl", "all/fkl_tau"), long_horizon_factor=5,
                long_horizon_seeds=(0, 2))
  got = grid.branches(g)
  long = [b for b in got if b.horizon > 1]
  assert got[-len(long):] == long and len(got) == 3 * 2 + 2 * 2
  assert [b.name for b in long] == ["long5x-correct_only-rkl-seed0", "long5x-all-fkl_tau-seed0",
                                    "long5x-correct_only-rkl-seed2", "long5x-all-fkl_tau-seed2"]
  cfg = _branch_cfg(got, "long5x-correct_only-rkl-seed2", grid_cfg=g)
  assert cfg.opsd.steps == 5 * 40 and cfg.seed == 2 + 5
  assert cfg.opsd.checkpoint_every == 40  # 200 steps: at most 5 checkpoints
  assert _branch_cfg(got, "correct_only-rkl-seed2", grid_cfg=g).opsd.steps == 40
  assert long[0].arm == "correct_only / rkl / 5x steps"
  # long_horizon_seeds empty: the grid's seeds
  g.long_horizon_seeds = ()
  assert [b.seed for b in grid.branches(g) if b.horizon > 1] == [0, 0, 1, 1, 2, 2]


def _paper_grid_config():
  import sys
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from experiments import toy_paper_grid
  return toy_paper_grid.get_config()


def test_validation_names_the_arm_tables():
  from opsd_jax import config, experiment
  cfg = _paper_grid_config()
  experiment.validate(cfg, check_devices=False)  # the preset: every arm, long horizon
  cfg.grid.update(dict(thinking_off_arms=("all/fkl_tau",),
                       long_horizon_arms=("correct_only/rkl_sampled",)))
  experiment.validate(cfg, check_devices=False)
  for key, value, message in (
      ("divergences", ("rkl", "jsd"), "grid.divergences: 'jsd' is not one of the arms"),
      ("thinking_off_arms", ("all/rkl_tau",), "grid.thinking_off_arms: 'all/rkl_tau'"),
      ("long_horizon_arms", ("best/rkl",), "grid.long_horizon_arms: 'best/rkl'"),
      ("long_horizon_factor", 1, "grid.long_horizon_factor must be >= 2"),
      ("tau", 0.0, "grid.tau")):
    bad = cfg.copy_and_resolve_references()
    bad.grid[key] = value
    with pytest.raises(config.ConfigError, match=re.escape(message)):
      experiment.validate(bad, check_devices=False)


# --------------------------------------------------------------------------------------------
# The report, from a constructed workdir (results.json entries and their sample files)
# --------------------------------------------------------------------------------------------


def _fake_eval(workdir, label, correct, lengths, mode=True, **fields):
  """Writes an evaluation's sample file as benchmarks.py does (one set, 'toy') and returns its
  results entry. correct, lengths: [problems, samples]."""
  from opsd_jax import benchmarks, evaluate
  problems, samples = np.shape(correct)
  ids = np.repeat(np.arange(problems), samples).tolist()
  flat_c, flat_l = np.ravel(correct).astype(bool).tolist(), np.ravel(lengths).tolist()
  texts = ["Wait, 7" if c else "7" for c in flat_c]
  path = benchmarks.eval_path(str(workdir), label, "toy")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  half = len(ids) // 2  # two chunks, as a resumed evaluation leaves them
  with open(path, "w") as f:
    f.write(json.dumps({"settings": dict(thinking=mode)}) + "\n")
    for c, part in enumerate((slice(0, half), slice(half, None))):
      f.write(json.dumps(dict(chunk=c, problem_ids=ids[part], correct=flat_c[part],
                              lengths=flat_l[part], truncated=[False] * len(ids[part]),
                              answers=["7"] * len(ids[part]), texts=texts[part])) + "\n")
  summary = evaluate.summarize(ids, flat_c, flat_l, [False] * len(ids), texts)
  summary["settings"] = dict(thinking=mode)
  return dict(summary, label=label, benchmarks={"toy": summary}, **fields)


def _fake_grid(workdir):
  """results.json of a finished grid whose effects are known: correct_only keeps accuracy and
  is 30 % shorter, incorrect_only loses every answer, the thinking-off arm equals its base;
  plus a long-horizon arm with a training trajectory."""
  rng = np.random.default_rng(0)
  P, n = 30, 2
  base_c = rng.random((P, n)) < 0.7
  base_l = rng.integers(40, 80, (P, n)).astype(float)
  results = dict(sft=_fake_eval(workdir, "sft", rng.random((P, n)) < 0.6, base_l + 20),
                 grid_sft_thinking_off=_fake_eval(workdir, "sft (thinking off)",
                                                  np.zeros((P, n)), base_l / 2, False),
                 rlvr=_fake_eval(workdir, "rlvr", base_c, base_l),
                 grid_base_thinking_off=_fake_eval(workdir, "base (thinking off)", base_c,
                                                   base_l / 2, False),
                 grid={})
  arms = [("correct_only", "rkl", True, 1, base_c, 0.7 * base_l),
          ("incorrect_only", "fkl_tau", True, 1, np.zeros((P, n)), base_l),
          ("all", "fkl", False, 1, base_c, base_l / 2),
          ("correct_only", "rkl", True, 5, base_c, 0.6 * base_l)]
  for rollout_filter, divergence, thinking, horizon, c, l in arms:
    for seed in ((0, 1) if horizon == 1 else (0,)):
      b = grid.Branch(rollout_filter, divergence, seed, thinking, horizon)
      results["grid"][b.name] = _fake_eval(
          workdir / "grid" / b.name, b.name, c, l + seed, thinking, rollout_filter=rollout_filter,
          divergence=divergence, seed=seed, thinking=thinking, horizon=horizon,
          opsd_steps=10 * horizon, base="rlvr", trained_tokens=1000 * horizon)
      if horizon > 1:
        with open(workdir / "grid" / b.name / "metrics.jsonl", "w") as f:
          for step in range(1, 51):
            f.write(json.dumps(dict(stage="opsd", step=step, accuracy=0.9,
                                    **{"completions/mean_length": 100.0 - step})) + "\n")
  (workdir / "results.json").write_text(json.dumps(results))
  return results


def test_report_intervals_claims_and_long_horizon(tmp_path):
  results = _fake_grid(tmp_path)
  grid_report.report(str(tmp_path), results, samples=300)
  summary = json.loads((tmp_path / "grid_summary.json").read_text())
  assert summary["bootstrap"] == dict(samples=300, seed=0, level=0.95,
                                      levels=["seeds", "problems"])
  assert [r["name"] for r in summary["base"]] == [
      "base = rlvr (thinking on)", "base = rlvr / thinking off", "sft (thinking on)",
      "sft / thinking off"]
  arms = {r["name"]: r for r in summary["arms"]}
  assert list(arms) == ["correct_only / rkl", "incorrect_only / fkl_tau",
                        "all / fkl / thinking off", "correct_only / rkl / 5x steps"]
  c = arms["correct_only / rkl"]
  assert c["seeds"] == 2 and c["accuracy_diff_points"] == 0 and c["accuracy_diff_points_ci"] \
      == [0, 0]
  lo, hi = c["length_diff_pct_ci"]
  assert hi < 0 and lo < c["length_diff_pct"] < hi
  assert c["reproduces"] == "yes" and c["claim"] == "correct_only"
  assert c["accuracy_pct_ci"][0] < c["accuracy_pct"] < c["accuracy_pct_ci"][1]
  i = arms["incorrect_only / fkl_tau"]
  assert i["accuracy_pct"] == 0 and i["accuracy_diff_points_ci"][1] < 0
  assert i["reproduces"] == "yes"
  off = arms["all / fkl / thinking off"]
  # against the thinking-off base, which it equals: Paper A's gain is not there
  assert off["accuracy_diff_points_ci"] == [0, 0] and off["reproduces"] == "no"
  assert off["length_diff_tokens"] == pytest.approx(0.5)  # seeds 0 and 1 add 0 and 1 token
  long = arms["correct_only / rkl / 5x steps"]
  assert long["seeds"] == 1 and long["reproduces"] == "yes" and long["opsd_steps"] == 50
  (trajectory,) = summary["long_horizon"]
  assert trajectory["steps_1x"] == 10 and trajectory["steps"] == 50 and trajectory["window"] == 1
  assert trajectory["rollout_mean_length_1x"] == 90 and trajectory["rollout_mean_length_end"] == 50
  (sft_gap, base_gap) = summary["thinking_gaps"]
  assert sft_gap["name"] == "sft" and sft_gap["accuracy_diff_points_ci"][1] < 0
  assert base_gap["accuracy_diff_points"] == 0 and base_gap["length_diff_pct"] == -50

  table = (tmp_path / "grid.md").read_text()
  header = next(l for l in table.splitlines() if l.startswith("| arm |"))
  for column in ("seeds", "accuracy % [95 % CI]", "Δ accuracy vs base, points [CI]",
                 "mean length, tokens [CI]", "Δ length vs base, % [CI]",
                 "hesitation markers / response", "trained tokens", "paper claim", "reproduces"):
    assert f"| {column} |" in header + " |"
  row = next(l for l in table.splitlines() if l.startswith("| correct_only / rkl |"))
  assert "| +0.0 [+0.0, +0.0] |" in row and "Paper B (Kim & Lee)" in row and row.endswith("| yes |")
  assert "B = 300 resamples" in table and "## Long horizon" in table
  assert "90.0 at step 10 (1x) → 50.0 at step 50" in table
  assert "- sft: accuracy -" in table
  for png in ("grid.png", "grid_long_horizon.png"):
    assert (tmp_path / png).stat().st_size > 1000
  # the command rewrites the report from the files alone, the same each time (B = 2000)
  (tmp_path / "grid.md").unlink()
  grid_report.main([str(tmp_path)])
  again = (tmp_path / "grid.md").read_text()
  assert "B = 2000 resamples" in again and again.replace("B = 2000", "B = 300") != table
  grid_report.main([str(tmp_path)])
  assert (tmp_path / "grid.md").read_text() == again


def test_report_without_sample_files_gives_values_without_intervals(tmp_path):
  import shutil
  results = _fake_grid(tmp_path)
  shutil.rmtree(tmp_path / "grid" / "correct_only-rkl-seed1" / "eval")
  grid_report.report(str(tmp_path), results, samples=100)
  arms = {r["name"]: r for r in json.loads((tmp_path / "grid_summary.json").read_text())["arms"]}
  c = arms["correct_only / rkl"]
  assert c["accuracy_pct_ci"] is None and c["reproduces"] == "not shown"
  assert c["accuracy_diff_points"] == pytest.approx(0)
  assert arms["incorrect_only / fkl_tau"]["accuracy_diff_points_ci"] is not None


def _branch_cfg(branches, name, grid_cfg=None, clip=-1.0):
  from opsd_jax import config
  base = config.default_config()
  base.seed = 5
  base.opsd.update(dict(teacher_thinking=False, steps=40, checkpoint_every=10, clip=clip))
  if grid_cfg is not None:
    base.grid = grid_cfg
  return grid._branch_config(base, next(b for b in branches if b.name == name))


def test_plan_counts_every_branch(tmp_path):
  cfg = _paper_grid_config()
  cfg.mesh.data = -1  # conftest fakes 8 CPU devices
  plan = pipeline.plan(cfg, str(tmp_path / "dry"))
  line = next(l for l in plan.splitlines() if l.startswith("grid:"))
  # 5 seeds x (3 filters x 4 arms + split_direction + 1 thinking-off arm), 3 long-horizon
  assert len(grid.branches(cfg.grid)) == 5 * (3 * 4 + 1 + 1) + 3 == 73
  assert line.startswith("grid: 73 OPSD branches from the last stage: 70 of 40 steps"), line
  assert "3 long-horizon of 200 steps (arms ['correct_only/rkl'] x seeds [0, 1, 2])" in line


def test_strategy_grid_preset_is_valid_and_adds_the_thinking_off_rkl_arm():
  from experiments import toy_strategy_grid
  cfg = experiment.validate(toy_strategy_grid.get_config(), check_devices=False)
  assert cfg.data.family == "strategy" and cfg.grid.thinking_off_arms == ("all/fkl", "all/rkl")
  thinking_off = [b for b in grid.branches(cfg.grid) if not b.thinking]
  assert {b.divergence for b in thinking_off} == {"fkl", "rkl"} and len(thinking_off) == 10
  assert len(grid.branches(cfg.grid)) == 5 * (3 * 4 + 1 + 2) + 3 == 78


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  cfg = _paper_grid_config()
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
  ro = rollouts.sample_and_grade(r.sampler, params, problems, num_samples=1, temperature=0.0,
                                 top_p=1.0, top_k=0, max_new_tokens=steps,
                                 rng=jax.random.key(0), thinking=False)
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


@pytest.mark.slow  # two CLI runs (SFT, RLVR, 5 branches, 10 evaluations): ~2-5 min, 2-core CPU
def test_grid_branches_share_the_base_and_report(tmp_path):
  workdir = tmp_path / "grid"
  args = [*TINY, "--config.rlvr.steps=1", "--config.opsd.steps=2",
          "--config.grid.rollout_filters=('correct_only','split_direction')",
          "--config.grid.divergences=('rkl','rkl_sampled')", "--config.grid.seeds=(0,)",
          "--config.grid.thinking_off_arms=('all/fkl_tau',)",
          "--config.grid.long_horizon_arms=('correct_only/rkl',)",
          "--config.grid.long_horizon_factor=2", "--config.grid.long_horizon_seeds=(0,)"]
  proc, _ = run(GRID, workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["grid"]) == sorted(
      f"{arm}-seed0" for arm in (
          "correct_only-rkl", "correct_only-rkl_sampled", "split_direction-rkl+fkl",
          "thinking_off-all-fkl_tau", "long2x-correct_only-rkl"))
  assert "opsd" not in results  # the base chain stops at RLVR; OPSD runs only as branches
  base_off, sft_off = results["grid_base_thinking_off"], results["grid_sft_thinking_off"]
  assert base_off["settings"]["thinking"] is False and results["rlvr"]["settings"]["thinking"]
  assert sft_off["settings"]["thinking"] is False and sft_off["label"] == "sft (thinking off)"
  for name, r in results["grid"].items():
    assert r["settings"]["thinking"] == r["thinking"] == (not name.startswith("thinking_off"))
    assert r["base"] == "rlvr" and r["opsd_steps"] == (4 if name.startswith("long") else 2)

  def opsd_steps(name):
    path = workdir / "grid" / name / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]

  # same checkpoint and seed => the same first rollouts in every thinking-on arm, long or not
  steps = {a: opsd_steps(f"{a}-seed0")[0]
           for a in ("correct_only-rkl", "correct_only-rkl_sampled", "split_direction-rkl+fkl",
                     "long2x-correct_only-rkl")}
  c = steps["correct_only-rkl"]
  for other in steps.values():
    assert other["accuracy"] == c["accuracy"]
    assert other["completions/mean_length"] == c["completions/mean_length"]
  assert steps["split_direction-rkl+fkl"]["opsd/selected_rows"] == 8
  assert c["opsd/selected_rows"] == round(8 * c["accuracy"])
  assert [r["step"] for r in opsd_steps("long2x-correct_only-rkl-seed0")] == [1, 2, 3, 4]

  table = (workdir / "grid.md").read_text()
  for arm in ("| base = rlvr (thinking on) |", "| base = rlvr / thinking off |",
              "| sft (thinking on) |", "| sft / thinking off |", "| correct_only / rkl |",
              "| correct_only / rkl_sampled |", "| split_direction / rkl+fkl |",
              "| all / fkl_tau / thinking off |", "| correct_only / rkl / 2x steps |"):
    assert arm in table
  header = next(l for l in table.splitlines() if l.startswith("| arm |"))
  assert header.split(" | ")[2:] == [
      "accuracy % [95 % CI]", "Δ accuracy vs base, points [CI]", "mean length, tokens [CI]",
      "Δ length vs base, % [CI]", "hesitation markers / response", "trained tokens",
      "paper claim", "reproduces |"]
  assert "## Long horizon" in table and "at step 2 (1x) →" in table and "at step 4;" in table
  assert "- sft: accuracy" in table  # thinking off against thinking on after SFT
  summary = json.loads((workdir / "grid_summary.json").read_text())
  assert len(summary["base"]) == 4 and len(summary["arms"]) == 5
  for row in summary["base"] + summary["arms"]:
    lo, hi = row["accuracy_pct_ci"]
    assert lo <= row["accuracy_pct"] <= hi
  arms = {r["name"]: r for r in summary["arms"]}
  assert arms["correct_only / rkl"]["reproduces"] in ("yes", "no", "not shown")
  assert arms["all / fkl_tau / thinking off"]["claim"] == "thinking_off"
  assert arms["split_direction / rkl+fkl"]["reproduces"] == "–"
  for png in ("grid.png", "grid_long_horizon.png"):
    assert (workdir / png).stat().st_size > 1000
  (workdir / "grid.md").unlink()
  grid_report.main([str(workdir)])  # the report alone, from results.json and the sample files
  assert (workdir / "grid.md").read_text() == table
  rerun, _ = run(GRID, workdir, *args)  # finished branches and evaluations are skipped
  assert rerun.returncode == 0 and "[grid " not in rerun.stdout and "[eval" not in rerun.stdout
