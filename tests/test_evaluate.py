"""Evaluation metrics against brute-force references; the table and the plots."""
import itertools
import math

import matplotlib.image
import numpy as np
import pytest

from opsd_jax import evaluate


def brute_force_pass_at_k(outcomes, k):
  """Fraction of all k-subsets of the samples that contain a correct one."""
  subsets = list(itertools.combinations(outcomes, k))
  return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_subset_enumeration(n):
  for num_correct in range(n + 1):
    outcomes = [True] * num_correct + [False] * (n - num_correct)
    for k in range(1, n + 1):
      assert evaluate.pass_at_k(n, num_correct, k) == pytest.approx(
          brute_force_pass_at_k(outcomes, k), abs=1e-12), (n, num_correct, k)


def test_pass_at_k_large_n_matches_binomials():
  n, c, k = 200, 7, 50
  expected = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-10)
  with pytest.raises(ValueError, match="k=9, n=8"):
    evaluate.pass_at_k(8, 1, 9)


def make_batch(seed=0, problems=6, samples=4):
  rng = np.random.default_rng(seed)
  problem_ids = np.repeat(np.arange(problems), samples)
  rng.shuffle(problem_ids)  # samples need not arrive grouped
  correct = rng.random(problems * samples) < 0.5
  lengths = rng.integers(5, 300, problems * samples)
  truncated = rng.random(problems * samples) < 0.2
  return problem_ids, correct, lengths, truncated


def test_summarize_against_loops():
  problem_ids, correct, lengths, truncated = make_batch()
  metrics = evaluate.summarize(problem_ids, correct, lengths, truncated, k=[1, 2, 4])
  per_problem = {}
  for p, c in zip(problem_ids, correct):
    per_problem.setdefault(p, []).append(bool(c))
  assert metrics["count"] == 24 and metrics["num_problems"] == 6
  assert metrics["samples_per_problem"] == 4
  assert metrics["avg@4"] == pytest.approx(np.mean([np.mean(v) for v in per_problem.values()]))
  for k in (1, 2, 4):
    assert metrics[f"pass@{k}"] == pytest.approx(
        np.mean([brute_force_pass_at_k(v, k) for v in per_problem.values()]))
  assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
  assert metrics["truncation_rate"] == pytest.approx(sum(truncated) / 24)
  right = [l for l, c in zip(lengths, correct) if c]
  wrong = [l for l, c in zip(lengths, correct) if not c]
  assert metrics["mean_length"] == pytest.approx(sum(lengths) / 24)
  assert metrics["mean_length_correct"] == pytest.approx(sum(right) / len(right))
  assert metrics["mean_length_incorrect"] == pytest.approx(sum(wrong) / len(wrong))
  assert metrics["median_length"] == pytest.approx(sorted(lengths)[11] / 2 + sorted(lengths)[12] / 2)


def test_summarize_default_k_and_empty_groups():
  metrics = evaluate.summarize([0, 0, 1, 1], [True, True, True, True], [3, 4, 5, 6],
                               [False] * 4)
  assert metrics["pass@1"] == 1.0 and metrics["pass@2"] == 1.0
  assert math.isnan(metrics["mean_length_incorrect"])


def test_majority_vote():
  problem_ids = [0, 0, 0, 1, 1, 1, 2, 2]
  answers = ["3", "4", "3", "7", None, "8", None, None]
  correct = [True, False, True, False, False, True, False, False]
  metrics = evaluate.summarize(problem_ids, correct, [1] * 8, [False] * 8, answers=answers)
  # problem 0: "3" wins (right); problem 1: tie 7 vs 8, first seen "7" (wrong); problem 2: none.
  assert metrics["maj@2"] == pytest.approx(1 / 3)


def test_hesitation_markers():
  texts = ["Wait, that is wrong. Hmm. Let me double-check: 2+2=4.",  # 3
           "Alternatively, let me verify it. Double check done.",     # 3
           "Waiting for hmmm; no markers here; doublecheck",          # 0
           "wait WAIT wait"]                                          # 3
  assert [evaluate.count_hesitation_markers(t) for t in texts] == [3, 3, 0, 3]
  lengths = [100, 50, 25, 25]
  metrics = evaluate.summarize([0, 1, 2, 3], [True, False, True, False], lengths,
                               [False] * 4, texts=texts)
  assert metrics["hesitation_per_1k_tokens"] == pytest.approx(1000 * 9 / 200)
  assert metrics["hesitation_response_fraction"] == 0.75


def test_summarize_bad_input():
  with pytest.raises(ValueError, match="lengths has 2 entries, problem_ids has 3"):
    evaluate.summarize([0, 0, 1], [True] * 3, [1, 2], [False] * 3)
  with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
    evaluate.summarize([0, 0], [True, False], [1, 2], [False] * 2, k=5)
  with pytest.raises(ValueError, match="no samples"):
    evaluate.summarize([], [], [], [])


def test_results_table():
  rows = [dict(stage="sft", accuracy=0.51234, mean_length=812.0),
          dict(stage="rlvr", accuracy=0.6, mean_length=float("nan"), note="a|b")]
  table = evaluate.results_table(rows, ["stage", "accuracy", "mean_length", "note"])
  assert table.splitlines() == [
      "| stage | accuracy | mean_length | note |",
      "|---|---|---|---|",
      "| sft | 0.5123 | 812 |  |",
      "| rlvr | 0.6 | – | a\\|b |"]
  assert evaluate.results_table(rows[:1]).splitlines()[0] == "| stage | accuracy | mean_length |"


def read_png(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image.std() > 0  # something was drawn
  return image


def test_plots(tmp_path):
  stages = [dict(stage="sft", accuracy=0.4, mean_length=900),
            dict(stage="rlvr", accuracy=0.6, mean_length=1100),
            dict(stage="opsd", accuracy=0.6, mean_length=700)]
  read_png(evaluate.plot_stages(stages, str(tmp_path / "stages.png")))
  curves = [dict(step=s, accuracy=0.1 * s, mean_length=1000 - 10 * s, run=r)
            for r in ("a", "b") for s in range(5)]
  read_png(evaluate.plot_curves(curves, str(tmp_path / "curves.png"), series_key="run"))
  grid = [dict(name=f"{f}/{d}", mean_length=500 + i * 50, accuracy=0.5 + 0.01 * i,
               accuracy_err=0.02, mean_length_err=20.0)
          for i, (f, d) in enumerate(itertools.product(["correct", "incorrect"], ["fkl", "rkl"]))]
  read_png(evaluate.plot_scatter(grid, str(tmp_path / "grid.png"), x_err_key="mean_length_err",
                                 y_err_key="accuracy_err"))


# ---------------------------------------------------------------------------------------------
# Several named benchmarks per run

@pytest.mark.parametrize("n, ks", [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]),
                                   (16, [1, 2, 4, 8, 16])])
def test_summarize_default_pass_at_powers_of_two(n, ks):
  problem_ids, correct, lengths, truncated = make_batch(seed=n, problems=5, samples=n)
  metrics = evaluate.summarize(problem_ids, correct, lengths, truncated)
  assert sorted(int(key[5:]) for key in metrics if key.startswith("pass@")) == ks
  per_problem = {}
  for p, c in zip(problem_ids, correct):
    per_problem.setdefault(p, []).append(bool(c))
  for k in ks:
    assert metrics[f"pass@{k}"] == pytest.approx(
        np.mean([brute_force_pass_at_k(v, k) for v in per_problem.values()]), abs=1e-12)


def benchmark_results():
  """Two benchmarks (4 and 2 samples per problem) after two stages; `rlvr` lacks `aime`."""
  results, raw = {}, {}
  for seed, (stage, name, samples) in enumerate([("sft", "math", 4), ("sft", "aime", 2),
                                                 ("rlvr", "math", 4)]):
    batch = make_batch(seed=seed, problems=5, samples=samples)
    texts = ["Wait, so 4." if c else "ok" for c in batch[1]]
    summary = evaluate.summarize(*batch, texts)
    summary["settings"] = dict(samples=samples, thinking=name == "math")
    results.setdefault(stage, {"benchmarks": {}})["benchmarks"][name] = summary
    raw[stage, name] = batch
  results["init"] = {"benchmarks": {}}  # evaluated on none of them
  return results, raw


def parse_table(table):
  lines = table.splitlines()
  split = lambda line: [cell.strip() for cell in line.strip("|").split("|")]
  return split(lines[0]), [split(line) for line in lines[2:]]


def test_benchmark_table_rows_and_numbers():
  results, raw = benchmark_results()
  assert [row["stage"] for row in evaluate.paper_summary(
      results, ["init", "sft", "rlvr"], ["math", "aime"])] == ["sft", "rlvr"]  # init: none
  header, rows = parse_table(evaluate.benchmark_table(
      results, ["init", "sft", "rlvr", "opsd"], ["math", "aime"]))
  assert header == ["stage", "benchmark", "thinking", "problems", "samples", "avg@n", "pass@1",
                    "pass@2", "pass@4", "mean length", "length correct", "length incorrect",
                    "truncated", "markers/response", "markers/1k tokens"]
  assert [row[:5] for row in rows] == [["sft", "math", "on", "5", "4"],
                                       ["sft", "aime", "off", "5", "2"],
                                       ["rlvr", "math", "on", "5", "4"]]
  for row, key in zip(rows, [("sft", "math"), ("sft", "aime"), ("rlvr", "math")]):
    problem_ids, correct, lengths, truncated = raw[key]
    cell = dict(zip(header, row))
    groups = [correct[problem_ids == p] for p in range(5)]
    expected = {
        "avg@n": correct.mean(), "pass@1": correct.mean(),
        "pass@2": np.mean([brute_force_pass_at_k(g, 2) for g in groups]),
        "mean length": lengths.mean(), "length correct": lengths[correct].mean(),
        "length incorrect": lengths[~correct].mean(), "truncated": truncated.mean(),
        "markers/response": correct.mean(),  # one "Wait" per correct response
        "markers/1k tokens": 1000 * correct.sum() / lengths.sum()}
    if len(groups[0]) == 4:
      expected["pass@4"] = np.mean([g.any() for g in groups])
    else:
      assert cell["pass@4"] == ""  # two samples: no pass@4
    for column, value in expected.items():
      assert float(cell[column]) == pytest.approx(float(value), rel=1e-3), (key, column)


def test_paper_summary_by_hand():
  def summary(accuracy, length):
    return dict(accuracy=accuracy, mean_length=length)
  results = {
      "sft": {"benchmarks": {"a": summary(0.5, 1000), "b": summary(0.3, 600)}},
      "rlvr": {"benchmarks": {"a": summary(0.7, 1200), "b": summary(0.5, 1000)}},
      "opsd": {"benchmarks": {"a": summary(0.68, 700), "b": summary(0.5, 500), "c": summary(1, 1)}},
      "extra": {"benchmarks": {"a": summary(0.9, 100)}},  # missing b: not comparable
  }
  rows = evaluate.paper_summary(results, ["init", "sft", "rlvr", "opsd", "extra"], ["a", "b"])
  assert [row["stage"] for row in rows] == ["sft", "rlvr", "opsd", "extra"]
  assert [row["benchmarks"] for row in rows] == [2, 2, 2, 1]
  assert [row["against"] for row in rows] == ["", "sft", "rlvr", "opsd"]
  np.testing.assert_allclose([row["accuracy_pct"] for row in rows[:3]], [40, 60, 59])
  np.testing.assert_allclose([row["mean_length"] for row in rows[:3]], [800, 1100, 600])
  np.testing.assert_allclose([row["accuracy_change_points"] for row in rows[1:3]], [20, -1])
  np.testing.assert_allclose([row["length_change_pct"] for row in rows[1:3]],
                             [100 * (1100 / 800 - 1), 100 * (600 / 1100 - 1)])
  assert [row["change"] for row in rows] == ["", "37.5 % longer at +20.0 points",
                                             "45.5 % shorter at -1.0 points", ""]
  assert math.isnan(rows[0]["accuracy_change_points"])
  assert math.isnan(rows[3]["accuracy_pct"]) and math.isnan(rows[3]["length_change_pct"])
  table = evaluate.results_table(rows, ["stage", "accuracy_pct", "mean_length", "change"])
  assert "| opsd | 59 | 600 | 45.5 % shorter at -1.0 points |" in table.splitlines()


def test_benchmark_reports_need_a_result(tmp_path):
  results, _ = benchmark_results()
  for call in (lambda: evaluate.benchmark_table(results, ["opsd"], ["math"]),
               lambda: evaluate.paper_summary(results, ["sft"], ["gsm8k"]),
               lambda: evaluate.plot_benchmarks(results, ["init"], ["math"],
                                                str(tmp_path / "x.png"))):
    with pytest.raises(ValueError, match="results hold none of the benchmarks"):
      call()


def test_plot_benchmarks(tmp_path):
  results, _ = benchmark_results()
  path = evaluate.plot_benchmarks(results, ["init", "sft", "rlvr", "opsd"], ["math", "aime"],
                                  str(tmp_path / "benchmarks.png"))
  image = read_png(path)
  assert image.shape[1] > image.shape[0]  # two panels side by side
