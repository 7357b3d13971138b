"""The verifier: extraction, the equivalence table, the fast path vs math-verify, adversarial input,
killable workers, and batch throughput."""
import json
import logging
import os
import pathlib
import signal
import threading
import time

import math_verify
import numpy as np
import pytest

from opsd_jax import grader as grader_lib
from opsd_jax import verify

CASES = [json.loads(line) for line in
         (pathlib.Path(__file__).parent / "data" / "equivalence_cases.jsonl").read_text().splitlines()]
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def grader():
  with grader_lib.Grader(num_workers=2, timeout_s=TIMEOUT_S) as g:
    yield g


def raw_math_verify(answer, gold):
  """math-verify as its docs call it, in this (main) thread, with its own SIGALRM timeouts."""
  logging.disable(logging.WARNING)
  parsed_gold = math_verify.parse("\\boxed{" + gold + "}")
  parsed_answer = math_verify.parse("\\boxed{" + answer + "}")
  return bool(parsed_gold and parsed_answer and math_verify.verify(parsed_gold, parsed_answer))


# ---------------------------------------------------------------------------------------------
# Extraction

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{3} then \boxed{4}", "4"),                        # the LAST box
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                     # nested braces
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                           # escaped braces are not nesting
    (r"\boxed {7} done", "7"),                                    # space before the brace
    (r"\fbox{8}", "8"),
    (r"\boxed{1} and \fbox{2}", "2"),
    (r"\boxed{ 5 }", "5"),
    (r"\boxed{\boxed{6}}", "6"),
    ("Thus 2+2=4.\n#### 4", "4"),                                 # GSM8K
    ("#### 1,234.\n", "1,234"),
    ("#### 3\nmore\n#### 5", "5"),
    (r"#### 3 but \boxed{9}", "9"),                               # a box wins over ####
    ("no answer here", None),
    (r"\boxed{}", None),                                          # empty box
    (r"\boxed{3} then \boxed{4", None),                           # last box unterminated
    (r"\boxed", None),
    (r"\boxedx{3}", None),
    (r"#### 5 then \boxed{", None),                               # a box exists: no #### fallback
])
def test_extract_answer_cases(text, expected):
  assert verify.extract_answer(text) == expected


def test_extract_answer_reads_only_the_tail():
  text = r"\boxed{1}" + "x" * 20_000
  assert verify.extract_answer(text) is None
  assert verify.extract_answer(text, max_chars=30_000) == "1"
  assert verify.extract_answer("y" * 50_000 + r"\boxed{2}") == "2"


def test_extract_answer_bytes_and_surrogates():
  raw = b"\xff\xfe bad utf8 \\boxed{12} \xc3("
  assert verify.extract_answer(raw) == "12"
  assert verify.extract_answer(raw.decode("utf-8", errors="surrogateescape")) == "12"


def test_extract_answer_deep_nesting_is_linear():
  depth = 50_000
  text = r"\boxed{" + "{" * depth + "1" + "}" * depth + "}"
  start = time.perf_counter()
  answer = verify.extract_answer(text, max_chars=len(text))
  assert time.perf_counter() - start < 1.0
  assert answer == "{" * depth + "1" + "}" * depth


def test_extract_answer_rejects_non_text():
  with pytest.raises(TypeError, match="str or bytes"):
    verify.extract_answer(12)


# ---------------------------------------------------------------------------------------------
# The equivalence table

def test_table_is_large_and_balanced():
  assert len(CASES) >= 100
  verdicts = [case["expected"] for case in CASES]
  assert 30 <= sum(verdicts) <= len(verdicts) - 30


def test_equivalence_table(grader):
  texts = [f"Reasoning... the answer is \\boxed{{{case['answer']}}}." for case in CASES]
  result = grader.grade(texts, [case["gold"] for case in CASES])
  wrong = [(case["answer"], case["gold"], case.get("grader", case["expected"]), bool(got))
           for case, got in zip(CASES, result.correct) if got != case.get("grader", case["expected"])]
  assert not wrong, f"(answer, gold, expected, got): {wrong}"
  assert result.counts["num_timed_out"] == 0 and result.counts["num_failed"] == 0
  # Every documented divergence from the right verdict is math-verify's own.
  for case in CASES:
    if "grader" in case:
      assert case["grader"] == case["math_verify"] != case["expected"], case


def test_table_records_math_verify_as_it_is():
  # Detects a math-verify upgrade that changes a verdict (then the table's notes need a look).
  for case in CASES:
    assert raw_math_verify(case["answer"], case["gold"]) == case["math_verify"], case


def test_is_equivalent_matches_table_sample():
  for case in CASES[::10]:
    assert grader_lib.is_equivalent(case["answer"], case["gold"], timeout_s=TIMEOUT_S) == \
        case.get("grader", case["expected"]), case


# ---------------------------------------------------------------------------------------------
# Fast path: decided in the parent, must give math-verify's verdict

def _simple_forms(rng, n):
  forms = []
  for _ in range(n):
    kind = rng.integers(4)
    sign = "-" if rng.random() < 0.3 else ""
    if kind == 0:
      forms.append(sign + str(rng.integers(0, 10**rng.integers(1, 20))))
    elif kind == 1:
      digits = rng.integers(1, 8)
      forms.append(f"{sign}{rng.integers(0, 1000)}.{rng.integers(0, 10**digits):0{digits}d}")
    elif kind == 2:
      forms.append(f"{sign}{rng.integers(0, 50)}/{rng.integers(1, 50)}")
    else:
      forms.append(f"{sign}\\frac{{{rng.integers(0, 50)}}}{{{rng.integers(1, 50)}}}")
  return forms


def _near(form, rng):
  """A second form near the first: equal values in another spelling, or tiny perturbations."""
  value = verify._simple_number(form)[0]
  choice = rng.integers(4)
  if choice == 0:
    return f"{float(value):.{rng.integers(1, 9)}f}"
  if choice == 1:
    return f"{value.numerator * 2}/{value.denominator * 2}"
  if choice == 2:
    return str(int(value)) if value.denominator == 1 else f"{float(value):.6f}"
  return f"{float(value) + rng.choice([-1, 1]) * 10.0**-rng.integers(4, 9):.9f}"


def test_fast_path_agrees_with_math_verify():
  rng = np.random.default_rng(0)
  firsts = _simple_forms(rng, 200)
  pairs = [(a, _near(a, rng)) for a in firsts] + list(zip(firsts, _simple_forms(rng, 200)))
  decided = 0
  for answer, gold in pairs:
    verdict = verify._fast_verdict(answer, gold)
    if verdict is None:
      continue
    decided += 1
    assert verdict == raw_math_verify(answer, gold), (answer, gold, verdict)
  assert decided > 250  # the fast path covers most plain numbers


def test_fast_path_leaves_non_numbers_to_math_verify():
  for answer, gold in [("５", "5"), ("1,000", "1000"), ("x", "1"), ("1/0", "1"),
                       ("12345678901234.5", "12345678901234.6"), ("0.1234565", "0.123456")]:
    assert verify._fast_verdict(answer, gold) is None, (answer, gold)


def test_toy_integers_take_the_fast_path(grader):
  result = grader.grade([f"<think>...</think> \\boxed{{{i}}}" for i in range(50)],
                        [str(i % 7) for i in range(50)])
  assert result.fast_path.all()
  np.testing.assert_array_equal(result.correct, [i == i % 7 for i in range(50)])


# ---------------------------------------------------------------------------------------------
# Adversarial model output: within the limit, incorrect, nothing executed

def test_adversarial_outputs(grader, tmp_path):
  sentinel = tmp_path / "executed"
  code = f"__import__('os').system('touch {sentinel}')"
  texts = [
      "a" * 10**6,                                                     # 10^6 characters, no box
      r"\boxed{" + "9" * 10**6 + "}",                                 # 10^6-character answer
      "b" * 10**6 + r"\boxed{1+}",                                    # long text, junk answer
      r"\boxed{9^{9^{9^{9}}}}",                                       # a power tower
      r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",               # thousands of nested braces
      r"\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}",               # ... all inside the tail
      r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",                 # deep parentheses
      r"\boxed{" + code + "}",                                        # code, never executed
      r"\boxed{__import__('os').remove('x')}",
      rf"\boxed{{\text{{{code}}}}}",
      r"\boxed{42}".encode() + b"\xff\xfe\xc3(",                      # invalid UTF-8 bytes
      (b"\\boxed{4\xff2}").decode("utf-8", errors="surrogateescape"),  # lone surrogates
      r"\boxed{４２}", r"\boxed{٤٢}", r"\boxed{𝟒𝟐}", r"\boxed{4２}",     # lookalike digits
  ]
  golds = ["1"] * 10 + ["41"] + ["42"] * 5
  start = time.perf_counter()
  result = grader.grade(texts, golds)
  elapsed = time.perf_counter() - start
  assert not result.correct.any(), result
  assert not sentinel.exists()
  # Two workers: the slow checks cannot take longer than their hard limits back to back.
  assert elapsed < 1.0 + TIMEOUT_S * len(texts) / 2, elapsed
  assert result.truncated_input[[0, 1, 2, 4]].all()
  assert result.extracted[0] is None
  assert result.extracted[1] is None and result.extracted[4] is None  # box begins before the tail
  assert result.too_long[5]
  assert result.timed_out[3]
  assert result.counts["num"] == len(texts)


def test_lookalike_of_the_right_answer_is_incorrect_but_ascii_is_correct(grader):
  result = grader.grade([r"\boxed{４２}", r"\boxed{42}", r"\boxed{−42}"], ["42", "42", "-42"])
  np.testing.assert_array_equal(result.correct, [False, True, True])


def test_timeout_is_counted_and_the_pool_recovers(grader):
  result = grader.grade([r"\boxed{2^{2^{40}}}", r"\boxed{\frac{2}{4}}"], ["1", "0.5"])
  np.testing.assert_array_equal(result.correct, [False, True])
  np.testing.assert_array_equal(result.timed_out, [True, False])
  assert grader.grade([r"\boxed{\sqrt{4}}"], ["2"]).correct[0]


def test_hard_limit_kills_a_stuck_worker():
  """A worker that cannot even take its soft alarm (stopped here with SIGSTOP) is killed at the
  hard limit and replaced; the batch still completes."""
  with grader_lib.Grader(num_workers=1, timeout_s=1.5) as g:
    assert g.grade([r"\boxed{\sqrt{9}}"], ["3"]).correct[0]  # started and warm
    pid = g._workers[0].process.pid
    stopper = threading.Timer(0.3, os.kill, (pid, signal.SIGSTOP))
    stopper.start()
    start = time.perf_counter()
    result = g.grade([r"\boxed{10^{10^{9}}}", r"\boxed{\frac{6}{4}}"], ["1", "1.5"])
    elapsed = time.perf_counter() - start
    stopper.join()
    assert result.timed_out[0] and not result.correct[0]
    assert result.correct[1]
    assert g.workers_replaced == 1
    assert g._workers[0].process.pid != pid
    assert elapsed < 15, elapsed


def test_worker_that_dies_is_replaced():
  with grader_lib.Grader(num_workers=1, timeout_s=TIMEOUT_S) as g:
    assert g.grade([r"\boxed{\sqrt{9}}"], ["3"]).correct[0]
    worker = g._workers[0]
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    result = g.grade([r"\boxed{\frac{1}{3}}", r"\boxed{\pi}"], ["2/6", "3.14"])
    np.testing.assert_array_equal(result.correct, [True, False])
    assert g.workers_replaced == 1


def test_bad_arguments():
  with pytest.raises(ValueError, match="2 texts but 1 golds"):
    grader_lib.Grader().grade(["a", "b"], ["1"])
  with pytest.raises(ValueError, match="num_workers"):
    grader_lib.Grader(num_workers=0)
  with pytest.raises(ValueError, match="timeout_s"):
    grader_lib.Grader(timeout_s=0)


def test_module_level_grade():
  result = grader_lib.grade([r"\boxed{\dfrac{3}{6}}", "none", r"\boxed{7}"], ["1/2", "1", "8"],
                        timeout_s=TIMEOUT_S)
  np.testing.assert_array_equal(result.correct, [True, False, False])
  assert result.extracted == [r"\dfrac{3}{6}", None, "7"]
  assert result.counts["num_no_answer"] == 1


def test_thousand_checks_in_bounded_time(grader):
  rng = np.random.default_rng(1)
  texts, golds = [], []
  for i in range(1000):
    n = int(rng.integers(1, 200))
    if i % 4 == 0:  # a LaTeX answer that needs math-verify
      texts.append(f"<think>...</think> \\boxed{{\\sqrt{{{n * n}}}}}")
      golds.append(str(n))
    else:
      texts.append(f"<think>...</think> \\boxed{{{n}}}")
      golds.append(str(n if i % 3 else n + 1))
  start = time.perf_counter()
  result = grader.grade(texts, golds)
  elapsed = time.perf_counter() - start
  print(f"1000 checks: {elapsed:.2f} s, {result.counts}")
  assert result.counts["num_timed_out"] == 0 and result.counts["num_fast_path"] == 750
  expected = [i % 4 == 0 or i % 3 != 0 for i in range(1000)]
  np.testing.assert_array_equal(result.correct, expected)
  assert elapsed < 60, elapsed
