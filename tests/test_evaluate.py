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
