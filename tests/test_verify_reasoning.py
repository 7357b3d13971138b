"""Grading reasoning-model responses (Qwen3 style): the answer is read after the last `</think>`,
an unclosed thought has no answer, and a gold may be a list of acceptable answers.

Verdicts are checked against the answer known to be right for each hand-written response."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd_jax import evaluate
from opsd_jax import grader as grader_lib
from opsd_jax import verify

TIMEOUT_S = 3.0

# A thought that boxes a tentative (wrong) answer, reconsiders, and answers differently after it.
DRAFT_THEN_FINAL = (
    "<think>\nOkay, let's see. The problem asks for the probability that two fair dice sum to 7.\n"
    "There are 36 outcomes. Pairs summing to 7: (1,6), (2,5), (3,4) ... so 3 of them, "
    "giving \\boxed{\\frac{1}{12}}.\n\nWait, that's not right. Order matters: (6,1), (5,2) and "
    "(4,3) count too, so there are 6 pairs. Let me double-check: 6/36 = 1/6. Yes.\n</think>\n\n"
    "There are $6$ ordered pairs out of $36$ equally likely outcomes, so the probability is\n\n"
    "$$\\boxed{\\frac{1}{6}}$$")
# The only box is inside the thought; the text after it states the answer in words.
BOXED_ONLY_IN_THOUGHT = (
    "<think>\nWe need $17 \\cdot 3 = 51$. So the answer is \\boxed{51}.\n</think>\n\n"
    "Multiplying, $17 \\times 3 = 51$.")
# Cut off by the token limit mid-thought, after a boxed draft.
UNCLOSED = (
    "<think>\nLet me compute $2^{10} = 1024$, so the remainder mod 1000 is \\boxed{24}.\n"
    "Hmm, but the question asks for $2^{100}$, not $2^{10}$. Using Euler's theorem with "
    "$\\varphi(125) = 100$, we get $2^{100} \\equiv 1 \\pmod{125}$, and")
NESTED_AFTER_THINK = (
    "<think>\nThe area is base times height over two: $\\frac{1 \\cdot 1}{2}$.\n</think>\n\n"
    "**Answer:** The area of the triangle is $\\boxed{\\frac{1}{2}}$.")
# The model quotes `</think>` inside its thought, then ends it; only the last close counts.
MULTIPLE_CLOSES = (
    "<think>\nFirst try: \\boxed{8}. I should end the thought with </think> and answer.\n"
    "Actually the sum is $3 + 4 + 5 = 12$, not 8.\n</think>\n\nThe sum is \\boxed{12}.")
THINKING_OFF = "<think>\n\n</think>\n\nThe sum of the roots is $-b/a = 5$, so \\boxed{5}."
NO_TAGS = "The sum of the roots is $-b/a = 5$.\n#### 5"
# A closed thought, an answer, then a new thought left open: still thinking at the end.
REOPENED = ("<think>\nSo it is 4.\n</think>\n\n\\boxed{4}\n\n<think>\nWait, let me recheck "
            "whether the answer should be")


@pytest.fixture(scope="module")
def grader():
  with grader_lib.Grader(num_workers=2, timeout_s=TIMEOUT_S) as g:
    yield g


@pytest.mark.parametrize("text, expected", [
    (DRAFT_THEN_FINAL, r"\frac{1}{6}"),
    (BOXED_ONLY_IN_THOUGHT, None),
    (UNCLOSED, None),
    (NESTED_AFTER_THINK, r"\frac{1}{2}"),
    (MULTIPLE_CLOSES, "12"),
    (THINKING_OFF, "5"),
    (NO_TAGS, "5"),
    (REOPENED, None),
])
def test_extract_answer_after_think(text, expected):
  assert verify.extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    (DRAFT_THEN_FINAL, r"\frac{1}{6}"),
    (BOXED_ONLY_IN_THOUGHT, "51"),   # the whole text: the thought's box counts
    (UNCLOSED, "24"),
    (MULTIPLE_CLOSES, "12"),
    (REOPENED, "4"),
])
def test_extract_answer_whole_text_when_configured(text, expected):
  assert verify.extract_answer(text, after_think=False) == expected


def test_answer_region():
  assert verify.answer_region(MULTIPLE_CLOSES) == "\n\nThe sum is \\boxed{12}."
  assert verify.answer_region(THINKING_OFF) == THINKING_OFF[len("<think>\n\n</think>"):]
  assert verify.answer_region(NO_TAGS) == NO_TAGS
  assert verify.answer_region(UNCLOSED) is None
  assert verify.answer_region(UNCLOSED, after_think=False) == UNCLOSED
  assert verify.answer_region("</think>") == ""
  # A prompt that opened the thought itself (the response has only the close) is read after it.
  assert verify.answer_region("draft \\boxed{1}</think>\\boxed{2}") == "\\boxed{2}"


def test_long_thought_cannot_hide_its_tags():
  """The tags are found beyond the `max_chars` tail: a long unclosed thought has no answer even
  though its tail has no tag, and a long answer after a closed thought is read from its tail."""
  filler = "Let me consider the next case carefully. " * 1000  # ~41k characters
  unclosed = "<think>\n" + filler + "So \\boxed{7}"
  assert verify.extract_answer(unclosed) is None
  assert verify.extract_answer(unclosed, after_think=False) == "7"
  closed = "<think>\nshort \\boxed{3}</think>\n" + filler + "Finally \\boxed{7}"
  assert verify.extract_answer(closed) == "7"


_PIECES = ["\\boxed{", "}", "{", "7", "x", " ", "\n", "#### 3\n", "<think>", "</think>", "<", ">"]
_pieces = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)
_no_tags = _pieces.filter(lambda s: "<think>" not in s and "</think>" not in s)


@settings(deadline=None, derandomize=True, database=None, max_examples=400,
          suppress_health_check=list(HealthCheck))
@given(thought=_pieces, closes=st.integers(1, 3), answer=_no_tags)
def test_after_think_reads_only_what_follows_the_last_close(thought, closes, answer):
  """Reference by construction: whatever precedes the last `</think>` (tags, drafts, boxes) does
  not change the answer; a `<think>` after it leaves no answer."""
  text = "<think>" + thought + "</think>" * closes + answer
  assert verify.extract_answer(text) == verify.extract_answer(answer, after_think=False)
  assert verify.extract_answer(text + "<think>" + answer) is None
  assert verify.extract_answer(answer) == verify.extract_answer(answer, after_think=False)


def test_grader_verdicts_on_reasoning_responses(grader):
  texts = [DRAFT_THEN_FINAL, DRAFT_THEN_FINAL, BOXED_ONLY_IN_THOUGHT, UNCLOSED, NESTED_AFTER_THINK,
           NESTED_AFTER_THINK, MULTIPLE_CLOSES, MULTIPLE_CLOSES, THINKING_OFF, NO_TAGS, REOPENED]
  golds = ["1/6", r"\frac{1}{12}", "51", "24", "0.5", r"\frac{1}{3}", "12", "8", "5", "5", "4"]
  # Right only where the final answer, read after the last </think>, equals the gold.
  expected = [True, False, False, False, True, False, True, False, True, True, False]
  result = grader.grade(texts, golds)
  np.testing.assert_array_equal(result.correct, expected)
  np.testing.assert_array_equal(result.unclosed_think,
                                [t in (UNCLOSED, REOPENED) for t in texts])
  assert result.counts["num_unclosed_think"] == 2
  assert result.counts["num_no_answer"] == 3  # the box only in the thought, and both unclosed


def test_grader_after_think_false_reads_the_whole_text():
  with grader_lib.Grader(num_workers=1, timeout_s=TIMEOUT_S, after_think=False) as g:
    result = g.grade([BOXED_ONLY_IN_THOUGHT, UNCLOSED, DRAFT_THEN_FINAL], ["51", "24", "1/6"])
  np.testing.assert_array_equal(result.correct, [True, True, True])
  assert not result.unclosed_think.any()


def test_truncated_input_measures_the_answer_region(grader):
  long_thought = "<think>\n" + "x" * 20_000 + "</think>\n\\boxed{3}"
  result = grader.grade([long_thought, "y" * 20_000 + "\\boxed{3}"], ["3", "3"])
  np.testing.assert_array_equal(result.correct, [True, True])
  np.testing.assert_array_equal(result.truncated_input, [False, True])


# ---------------------------------------------------------------------------------------------
# Lists of acceptable golds

LIST_ANSWERS = ["\\boxed{\\sqrt{2}}", "\\boxed{2}", "\\boxed{0.5}", "\\boxed{\\pi}", "\\boxed{7}",
                "no answer"]
LIST_GOLDS = [["1.5", "2^{1/2}"], ("3", "4"), [r"\frac{1}{2}"], ["3.14", r"\pi", "180^\\circ"],
              ["7", "7"], ["1"]]
LIST_EXPECTED = [True, False, True, True, True, False]


def test_list_golds_by_hand(grader):
  result = grader.grade(LIST_ANSWERS, LIST_GOLDS)
  np.testing.assert_array_equal(result.correct, LIST_EXPECTED)
  # Decided without math-verify: 2 against 3 and 4, 0.5 against 1/2, 7 against 7.
  np.testing.assert_array_equal(result.fast_path, [False, True, True, False, True, False])


def test_list_gold_is_any_of_its_single_golds(grader):
  """A list gold's verdict equals the OR of the single-gold verdicts (checked one by one)."""
  answers = ["\\boxed{\\frac{2}{4}}", "\\boxed{x=3}", "\\boxed{(1,2)}", "\\boxed{10\\%}",
             "\\boxed{3}"]
  options = ["0.5", "3", "(1, 2)", "0.1", "x", "\\{1,2\\}"]
  gold_lists = [options[:2], options[1:4], options[3:], options[::2], options[1::2]]
  texts = [a for a in answers for _ in gold_lists]
  golds = [g for _ in answers for g in gold_lists]
  combined = grader.grade(texts, golds).correct
  single = {(a, g): c for a, g, c in zip(
      [a for a in answers for _ in options], [g for _ in answers for g in options],
      grader.grade([a for a in answers for _ in options],
                   [g for _ in answers for g in options]).correct)}
  reference = [any(single[(t, g)] for g in gold) for t, gold in zip(texts, golds)]
  assert any(reference) and not all(reference)
  np.testing.assert_array_equal(combined, reference)


def test_mixed_str_and_list_golds_and_is_equivalent(grader):
  result = grader.grade(["\\boxed{4}", "\\boxed{4}", "\\boxed{4}"], ["4", ["5", "4"], ("5",)])
  np.testing.assert_array_equal(result.correct, [True, True, False])
  assert grader.is_equivalent("\\sqrt{2}", ["1", "2^{1/2}"])
  assert not grader.is_equivalent("\\sqrt{2}", ("1", "2"))
  assert grader_lib.is_equivalent("0.5", ["3", r"\frac{1}{2}"], timeout_s=TIMEOUT_S)


def test_empty_gold_list_is_an_error(grader):
  with pytest.raises(ValueError, match="gold answer list of response 1 is empty"):
    grader.grade(["\\boxed{1}", "\\boxed{1}"], ["1", []])
  with pytest.raises(ValueError, match="gold answer list is empty"):
    grader.is_equivalent("1", ())


def test_one_equal_gold_clears_the_others_timeouts_and_failures(grader, monkeypatch):
  """With several golds, a check that timed out or failed does not count once another is equal;
  with none equal it does. (The pool's statuses are stubbed in pair order.)"""
  statuses = {("\\sqrt{2}", "a"): "timeout", ("\\sqrt{2}", "b"): "equal",
              ("\\sqrt{3}", "a"): "timeout", ("\\sqrt{3}", "c"): "error"}
  monkeypatch.setattr(grader, "_check_all", lambda pairs, timeout_s: [statuses[p] for p in pairs])
  result = grader.grade(["\\boxed{\\sqrt{2}}", "\\boxed{\\sqrt{3}}"], [["a", "b"], ["a", "c"]])
  np.testing.assert_array_equal(result.correct, [True, False])
  np.testing.assert_array_equal(result.timed_out, [False, True])
  np.testing.assert_array_equal(result.failed, [False, True])


# ---------------------------------------------------------------------------------------------
# Truncation: a cut-off response is incorrect and counted as truncated

def test_cut_off_responses_are_incorrect_and_counted_as_truncated(grader):
  """As rollouts.sample_and_grade does: correct = graded & finished, truncated = ~finished. A
  response cut off after its final box is incorrect; one that finished with its thought unclosed
  is incorrect but not truncated."""
  texts = [DRAFT_THEN_FINAL, DRAFT_THEN_FINAL, UNCLOSED, UNCLOSED, THINKING_OFF, NO_TAGS]
  golds = ["1/6", "1/6", "24", "24", "5", "5"]
  finished = np.array([True, False, False, True, True, True])
  graded = grader.grade(texts, golds).correct
  correct = graded & finished
  np.testing.assert_array_equal(correct, [True, False, False, False, True, True])
  summary = evaluate.summarize([0, 0, 1, 1, 2, 2], correct, [900, 1000, 1000, 700, 50, 40],
                               ~finished, texts)
  assert summary["truncation_rate"] == pytest.approx(2 / 6)
  assert summary["accuracy"] == pytest.approx(3 / 6)
  assert summary["mean_length_incorrect"] == pytest.approx((1000 + 1000 + 700) / 3)
