"""The strategy toy family, checked by re-deriving every trace's kind from its text with an
independent solver (Python's own operator precedence)."""
import json
import operator
import re

import pytest

from opsd_jax.data import toy_stats, toy_strategy

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")


def parse(question):
  m = re.fullmatch(r"Compute ((?:\d [-+*] ){3}\d)\.", question)
  tokens = m.group(1).split()
  return [int(t) for t in tokens[::2]], tokens[1::2], m.group(1)


def left_to_right_value(nums, ops):
  value = nums[0]
  for op, b in zip(ops, nums[1:]):
    value = OPS[op](value, b)
  return value


def steps_of(text):
  steps = STEP.findall(text)
  assert all(OPS[op](int(a), int(b)) == int(c) for a, op, b, c in steps), text
  return steps


def boxed(text):
  return re.findall(r"\\boxed\{(\d+)\}", text)[-1]


@pytest.fixture(scope="module")
def splits():
  return toy_strategy.make_splits(seed=5, num_train=4000, num_test=300)


def test_deterministic_disjoint_and_test_set_fixed(splits):
  train, test = splits
  assert toy_strategy.make_splits(5, 4000, 300) == (train, test)
  assert toy_strategy.make_splits(6, 4000, 300)[0] != train
  assert not {p["question"] for p in train} & {p["question"] for p in test}
  assert len({p["question"] for p in train}) == 4000
  assert toy_strategy.make_splits(5, 50, 300)[1] == test


def test_answers_and_wrong_plans_against_an_independent_solver(splits):
  train, test = splits
  for p in train + test:
    nums, ops, expr = parse(p["question"])
    assert p["answer"] == str(eval(expr))  # precedence: Python's own
    l2r = left_to_right_value(nums, ops)
    assert p["wrong_order_answer"] == str(l2r) != p["answer"]
    ref = steps_of(p["reference"])
    assert ref[0][1] == "*" and ref[-1][3] == p["answer"]
    assert p["misread_answers"] and p["answer"] not in p["misread_answers"]
    values = [int(c) for *_, c in steps_of(p["trace"] + " " + p["short_trace"])]
    assert all(0 <= v <= 40 for v in values)


def test_each_trace_is_the_kind_it_says(splits):
  train, _ = splits
  for p in train:
    trace, kind = p["trace"], p["trace_kind"]
    answer = boxed(trace)
    assert (answer == p["answer"]) == p["trace_correct"] == (kind in ("direct", "dead_end"))
    assert (toy_strategy.ABANDON in trace) == (kind == "dead_end")
    if kind == "dead_end":  # a left-to-right start abandoned, then the right plan
      before = trace.split(toy_strategy.ABANDON)[0]
      nums, ops, _ = parse(p["question"])
      first = steps_of(before)[0]
      assert (int(first[0]), first[1], int(first[2])) == (nums[0], ops[0], nums[1])
    assert toy_strategy.classify_error(p, answer) == ("right" if p["trace_correct"] else kind)
    short = p["short_trace"]
    assert "Wait" not in short and "<think>" not in short
    expected = "right" if p["short_trace_correct"] else p["short_trace_kind"]
    assert toy_strategy.classify_error(p, boxed(short)) == expected
  assert toy_strategy.classify_error(train[0], None) == "no_answer"
  assert toy_strategy.classify_error(train[0], "1000") == "other"


def test_kind_shares_follow_the_style_and_thinking_off_is_less_accurate(splits):
  train, _ = splits
  style = toy_strategy.StrategyStyle()
  n = len(train)
  for kind, share in (("dead_end", style.dead_end), ("wrong_order", style.wrong_order),
                      ("misread", style.misread)):
    assert abs(sum(p["trace_kind"] == kind for p in train) / n - share) < 0.03
  for kind, share in (("wrong_order", style.short_wrong_order),
                      ("misread", style.short_misread)):
    assert abs(sum(p["short_trace_kind"] == kind for p in train) / n - share) < 0.03
  on = sum(p["trace_correct"] for p in train) / n
  off = sum(p["short_trace_correct"] for p in train) / n
  assert on - off > 0.15


def test_bad_style_is_an_error():
  with pytest.raises(ValueError, match="thinking on"):
    toy_strategy.StrategyStyle(dead_end=0.6, wrong_order=0.5)


def test_toy_stats_reports_the_kind_shares():
  result = toy_stats.main(["--family", "strategy", "--seed", "5", "--n", "400"])
  train, _ = toy_strategy.make_splits(5, 400, 0)
  on = result["trace_kinds_thinking_on"]
  assert on["dead_end"] == sum(p["trace_kind"] == "dead_end" for p in train) / 400
  assert result["trace_kinds_thinking_off"]["dead_end"] == 0.0
  assert abs(sum(on.values()) - 1.0) < 1e-9
  assert result["right_answer_thinking_off"] == sum(p["short_trace_correct"] for p in train) / 400


def test_error_kinds_of_a_run_classify_each_evaluation(tmp_path):
  """A run's evaluations (a stage and two seeds of a grid arm) read back from their sample files
  and classified; the test problems regenerated from the run's config.json."""
  from opsd_jax import benchmarks, error_kinds
  _, test = toy_strategy.make_splits(0, 50, 8)
  (tmp_path / "config.json").write_text(json.dumps(
      {"seed": 0, "data": {"family": "strategy", "num_train": 50, "num_test": 8}}))
  right = [p["answer"] for p in test]
  answers = {"rlvr": right[:4] + [test[4]["wrong_order_answer"], test[5]["misread_answers"][0],
                                  "999", None],
             "b0": [test[i]["wrong_order_answer"] for i in range(8)],
             "b1": right}
  results = {"rlvr": {"label": "rlvr", "benchmarks": {"toy": {}}}, "grid": {}}
  for name, given in answers.items():
    workdir = tmp_path if name == "rlvr" else tmp_path / "grid" / name
    benchmarks._append(benchmarks.eval_path(workdir, name, "toy"), {"n": 8},
                       dict(chunk=0, problem_ids=list(range(8)), answers=given,
                            correct=[a == r for a, r in zip(given, right)], lengths=[1] * 8,
                            truncated=[False] * 8, texts=[""] * 8))
    if name != "rlvr":
      results["grid"][name] = {"label": name, "benchmarks": {"toy": {}}, "seed": int(name[1]),
                               "rollout_filter": "incorrect_only", "divergence": "rkl"}
  (tmp_path / "results.json").write_text(json.dumps(results))
  rows = {r["evaluation"]: r for r in error_kinds.table(str(tmp_path))}
  assert rows["rlvr (thinking on)"] == dict(evaluation="rlvr (thinking on)", seeds=1, right=0.5,
                                            wrong_order=0.125, misread=0.125, other=0.125,
                                            no_answer=0.125)
  arm = rows["incorrect_only / rkl"]
  assert arm["seeds"] == 2 and arm["right"] == 0.5 and arm["wrong_order"] == 0.5
