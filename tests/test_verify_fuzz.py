"""Fuzzing the answer extractor and the grader with hypothesis: thousands of random and adversarial
strings; no crash, no hang past the limit, nothing executed. Counts are printed (run with -s)."""
import collections
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd_jax import grader as grader_lib
from opsd_jax import verify
from pipeline_helpers import record_fuzz_counts

TIMEOUT_S = 1.0
NUM_WORKERS = 2
COUNTS = collections.Counter()
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# LaTeX-ish and hostile fragments that random text rarely reaches on its own.
PIECES = ["\\boxed{", "\\boxed {", "\\fbox{", "}", "{", "}}", "\\frac", "\\dfrac", "^", "_", "9",
          "1", "0", "\\sqrt", "(", ")", "[", "]", "\\", "\\\\", "x", "=", ",", "\\{", "\\}",
          "#### ", "\n", "\\infty", "!", "10^{10^{", "__import__('os').system('touch SENTINEL')",
          "eval(", "exec(", "\ud800", "\udcff", "４", "٤", "𝟒", "−", "\\text{", "$", "\\left(",
          "\\right)", "e", ".", "/", "-", "%", "\\%", "^\\circ", "\\pi", "\\cdot", "\\begin{pmatrix}",
          "&", "\\end{pmatrix}", "\\lim", "\\int", "\\sum_{n=1}^{\\infty}", "<think>", "</think>",
          "\x00", "\u202e", " ", "\\,", "\\!"]


@pytest.fixture(scope="module", autouse=True)
def _report_counts(tmp_path_factory):
  """Counts also go to <pytest basetemp>/fuzz_counts.json ("verify"), readable without -s."""
  yield
  record_fuzz_counts(tmp_path_factory, "verify", COUNTS)


piece_strings = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
any_text = st.text(max_size=300)
surrogate_text = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(),
                         max_size=100)
fuzz_text = st.one_of(any_text, piece_strings, surrogate_text,
                      st.binary(max_size=200),
                      st.tuples(any_text, piece_strings).map(lambda t: t[0] + "\\boxed{" + t[1] + "}"),
                      st.tuples(piece_strings, piece_strings).map(lambda t: t[0] + " #### " + t[1]))


@settings(FUZZ, max_examples=3000)
@given(fuzz_text)
def test_extract_answer_never_crashes(text):
  COUNTS["extract"] += 1
  start = time.perf_counter()
  answer = verify.extract_answer(text)
  assert time.perf_counter() - start < 1.0
  assert answer is None or (isinstance(answer, str) and answer and len(answer) <= 10_000)
  if answer is not None:
    COUNTS["extract_found"] += 1


def _balanced(depth):
  """Balanced brace content without backslashes: what a box holds."""
  leaf = st.text(st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)),
                 max_size=8)
  if depth == 0:
    return leaf
  return st.lists(st.one_of(leaf, _balanced(depth - 1).map(lambda s: "{" + s + "}")),
                  max_size=4).map("".join)


@settings(FUZZ, max_examples=500)
@given(prefix=any_text.filter(lambda s: "\\boxed" not in s and "\\fbox" not in s),
       content=_balanced(3), suffix=st.text(st.characters(blacklist_characters="{}\\"), max_size=50))
def test_extract_answer_finds_the_last_box_exactly(prefix, content, suffix):
  COUNTS["extract_roundtrip"] += 1
  text = prefix + "\\boxed{0}" + "\\boxed{" + content + "}" + suffix
  # The whole text: brace matching is under test here, not the `<think>` region.
  assert verify.extract_answer(text, after_think=False) == (content.strip() or None)


@pytest.fixture(scope="module")
def grader():
  with grader_lib.Grader(num_workers=NUM_WORKERS, timeout_s=TIMEOUT_S) as g:
    yield g


def test_grader_fuzz(grader, tmp_path):
  """Batches of fuzzed responses: each batch finishes within its hard limits, nothing is correct
  unless the verdict can be true, and no injected code runs."""
  sentinel = tmp_path / "executed"
  golds = st.sampled_from(["1", "42", "\\frac{1}{2}", "\\sqrt{2}", "x=3", "(1,2)", "\\{1,2\\}",
                           "10\\%", "\\pi"])
  boxed = piece_strings.map(lambda s: "The answer is \\boxed{" + s + "}.")
  batches = st.lists(st.tuples(st.one_of(fuzz_text, boxed, boxed), golds), min_size=10,
                     max_size=30)

  @settings(FUZZ, max_examples=150)
  @given(batches)
  def run(batch):
    texts = [t.replace("SENTINEL", str(sentinel)) if isinstance(t, str) else t for t, _ in batch]
    gold_list = [g for _, g in batch]
    start = time.perf_counter()
    result = grader.grade(texts, gold_list)
    elapsed = time.perf_counter() - start
    pairs = len(set((verify.normalize(e), g) for e, g, fast, long in
                    zip(result.extracted, gold_list, result.fast_path, result.too_long)
                    if e is not None and not fast and not long))
    # Hard limit per check, NUM_WORKERS in parallel, plus restarts of killed workers.
    bound = TIMEOUT_S * math.ceil(pairs / NUM_WORKERS) + 3.0 * (1 + grader.workers_replaced)
    assert elapsed < bound + 5.0, (elapsed, pairs)
    assert result.correct.shape == result.timed_out.shape == (len(batch),)
    assert not (result.correct & (result.timed_out | result.failed | result.too_long)).any()
    assert all(e is not None for e, c in zip(result.extracted, result.correct) if c)
    COUNTS["grade_texts"] += len(batch)
    COUNTS["grade_checks"] += pairs
    for key, value in result.counts.items():
      COUNTS["grade_" + key] += value

  run()
  assert not sentinel.exists()
  COUNTS["workers_replaced"] = grader.workers_replaced
  print("\nfuzz counts:", dict(sorted(COUNTS.items())))
  assert COUNTS["grade_texts"] >= 1000
