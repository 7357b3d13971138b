"""Answer extraction and equivalence: the one verdict for RLVR rewards and evaluation.

This module is the answer logic: where a response's answer is (`answer_region`, `extract_answer`),
how answers are normalised, the exact fast verdict on plain numbers, and the math-verify
comparison (`math_verify_equal`) that the worker processes run. The pool that runs it,
`opsd_jax.grader` (`Grader`, `GradeResult`: killable workers with hard wall-clock limits), lives
apart so the verdict policy reads without the process management; it imports this module, never
the other way round, and holds the conveniences `grader.is_equivalent` / `grader.grade` (one
shared pool). Bench: `python bench/verify.py`.

Model text is untrusted input. It is never executed; it is only matched with regexes, parsed with
`fractions.Fraction` on the fast path, or parsed by math-verify (LaTeX -> SymPy) inside worker
processes that are killed when a check runs past its hard wall-clock limit (`opsd_jax.grader`
says why processes).

Verdict policy (tests/data/equivalence_cases.jsonl documents each case):
- reasoning models (Qwen3) think inside `<think>...</think>` and answer after it, so by default
  (`after_think`) only the text after the LAST `</think>` is read: a box inside the thought is a
  draft; a `<think>` still open at the end (cut off, or never finished thinking) -> no answer; a
  response without think tags (thinking-off models, the toy) is read whole.
- the answer is the LAST `\\boxed{...}` / `\\fbox{...}` (brace-matched); no box -> the last `#### N`
  (GSM8K); neither, an empty box or an unterminated last box -> no answer -> incorrect.
- a gold answer is a string or a list of acceptable strings (correct if equal to any).
- equivalence is math-verify's (`parse` both sides, `verify(gold, answer)`), with two repairs:
  digit groups separated by thin spaces (`1\\,000`, `1 000`) are joined first, since math-verify
  reads them as the product 1*000 = 0; and a sentence's final period after a number (`5.`) is
  dropped, since math-verify cannot parse it.
- answers of plain integers / decimals / simple fractions on both sides are decided in the parent
  (exact rational arithmetic) when the verdict is certain to equal math-verify's; otherwise the
  check goes to a worker.
- a timed-out, crashed or over-long check is incorrect and counted.
"""
from __future__ import annotations

import fractions
import re

# Only the tail of a response is searched for the answer: the final answer sits at the end, and
# this bounds the work per response whatever the model emits.
DEFAULT_MAX_CHARS = 10_000
# An extracted answer longer than this is graded incorrect without parsing (and counted).
DEFAULT_MAX_ANSWER_CHARS = 1_000

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def to_text(text) -> str:
  """str with any invalid UTF-8 or lone surrogates replaced by U+FFFD (never raises)."""
  if isinstance(text, (bytes, bytearray)):
    return bytes(text).decode("utf-8", errors="replace")
  if not isinstance(text, str):
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def _matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` closing the `{` at open_index; backslash escapes (`\\{`) are skipped."""
  depth = 0
  for token in _BRACE_TOKEN.finditer(text, open_index):
    symbol = token.group()
    if symbol == "{":
      depth += 1
    elif symbol == "}":
      depth -= 1
      if depth == 0:
        return token.start()
  return None


def answer_region(text: str, after_think: bool = True) -> str | None:
  """The part of a response that holds its final answer (None: it has none).

  With `after_think` (Qwen3's own evaluation): the text after the last `</think>`; None when a
  `<think>` is open at the end (the response was cut off or never finished thinking, so anything
  boxed is a draft); the whole text when there are no think tags (thinking-off models, the toy).
  Without it: the whole text. The tags are searched in the whole response, not only its tail, so
  a long thought cannot hide its opening tag.
  """
  text = to_text(text)
  if not after_think:
    return text
  close = text.rfind(THINK_CLOSE)
  start = 0 if close < 0 else close + len(THINK_CLOSE)
  if text.find(THINK_OPEN, start) >= 0:
    return None
  return text[start:]


def extract_answer(text: str, max_chars: int = DEFAULT_MAX_CHARS,
                   after_think: bool = True) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed {...}`), brace-matched,
  in the response's `answer_region` (after the last `</think>` by default).

  Falls back to the last `#### N` line (GSM8K) only when the region has no box at all. Returns None
  when there is no answer region or answer, the answer is empty, or the last box is unterminated (a
  response cut off inside its final box has no final answer; an earlier box is a draft, not the
  answer). Only the last `max_chars` characters of the region are searched.
  """
  text = answer_region(text, after_think)
  if text is None:
    return None
  if len(text) > max_chars:
    text = text[-max_chars:]
  last_box = None
  for last_box in _BOX_OPEN.finditer(text):
    pass
  if last_box is not None:
    open_index = last_box.end() - 1
    close_index = _matching_brace(text, open_index)
    if close_index is None:
      return None
    answer = text[open_index + 1:close_index].strip()
    return answer or None
  last_hashes = None
  for last_hashes in _GSM8K_ANSWER.finditer(text):
    pass
  if last_hashes is None:
    return None
  answer = last_hashes.group(1).strip().rstrip(".").strip()
  return answer or None


# ------------------------------------------------------------------------------------------------
# Normalisation shared by the fast path and the workers.

# 1\,000 / 1\ 000 / 1~000 / "1 000": digit groups joined by a (thin) space.
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,;: !]|~| )\d{3})+(?![\d.])")
_GROUP_SEPARATOR = re.compile(r"\\[,;: !]|~| ")


_TRAILING_PERIOD = re.compile(r"(?<=[0-9])\.$")


def normalize(answer: str) -> str:
  """Repairs for forms math-verify misreads: `1\\,000` (as 1*000) and a final period (`5.`)."""
  answer = _TRAILING_PERIOD.sub("", answer.strip())
  return _SPACED_THOUSANDS.sub(lambda m: _GROUP_SEPARATOR.sub("", m.group()), answer)


# ------------------------------------------------------------------------------------------------
# Fast path: plain integers, decimals and simple fractions, ASCII digits only (a fullwidth or
# Arabic-Indic digit is not a number to math-verify either).

_INT = r"-?[0-9]+"
_DECIMAL = r"-?[0-9]+\.[0-9]+"
_SLASH_FRACTION = re.compile(r"(-?[0-9]+)/([0-9]+)", re.ASCII)
_LATEX_FRACTION = re.compile(r"(-?)\\d?frac\{(-?[0-9]+)\}\{([0-9]+)\}", re.ASCII)
_PLAIN_NUMBER = re.compile(rf"{_DECIMAL}|{_INT}", re.ASCII)
# Limits within which math-verify's parse is exact: a SymPy Float keeps 15 significant digits.
_MAX_INT_DIGITS = 40
_MAX_DECIMAL_DIGITS = 12
# math-verify compares a float to 6 decimal places; a gap wider than this is unequal for sure.
_SURELY_UNEQUAL_GAP = fractions.Fraction(1, 10**5)


def _simple_number(answer: str) -> tuple[fractions.Fraction, bool] | None:
  """(value, is_decimal) for `12`, `-3.25`, `7/8`, `\\frac{7}{8}`, `-\\dfrac{1}{2}`; else None."""
  if len(answer) > _MAX_INT_DIGITS + 2:
    return None
  if _PLAIN_NUMBER.fullmatch(answer):
    digits = sum(c.isdigit() for c in answer)
    is_decimal = "." in answer
    if is_decimal and digits > _MAX_DECIMAL_DIGITS:
      return None
    return fractions.Fraction(answer), is_decimal
  match = _SLASH_FRACTION.fullmatch(answer)
  sign = ""
  if match is None:
    match = _LATEX_FRACTION.fullmatch(answer)
    if match is None:
      return None
    sign, numerator, denominator = match.groups()
  else:
    numerator, denominator = match.groups()
  if int(denominator) == 0:
    return None  # math-verify's complex infinity; let it decide
  value = fractions.Fraction(int(numerator), int(denominator))
  return (-value if sign else value), False


def _fast_verdict(answer: str, gold: str) -> bool | None:
  """math-verify's verdict where it is certain from exact arithmetic, else None (ask a worker)."""
  parsed_answer, parsed_gold = _simple_number(answer), _simple_number(gold)
  if parsed_answer is None or parsed_gold is None:
    return None
  (a, a_decimal), (g, g_decimal) = parsed_answer, parsed_gold
  if a == g:
    return True
  if not (a_decimal or g_decimal):
    return False  # integers and rationals compare exactly in math-verify
  if abs(a - g) > _SURELY_UNEQUAL_GAP:
    for side, is_decimal in ((answer, a_decimal), (gold, g_decimal)):
      if not is_decimal and sum(c.isdigit() for c in side) > _MAX_DECIMAL_DIGITS:
        return None  # compared as a 15-digit float by math-verify: not certain
    return False
  return None


# ------------------------------------------------------------------------------------------------
# Several acceptable golds, and math-verify itself (run inside the grader's workers).

def gold_options(gold, index: int | None = None) -> list[str]:
  """The normalised acceptable answers of one gold: a string, or a non-empty list/tuple of them."""
  if isinstance(gold, (list, tuple)):
    if not gold:
      where = "" if index is None else f" of response {index}"
      raise ValueError(f"grade: the gold answer list{where} is empty")
    return list(dict.fromkeys(normalize(to_text(g)) for g in gold))
  return [normalize(to_text(gold))]


def fast_verdicts(answer: str, golds: list[str]) -> tuple[bool, list[tuple[str, str]]]:
  """(True, []) when the fast path finds the answer equal to one of the (normalised) golds; else
  (False, the (answer, gold) pairs it could not decide, for math-verify)."""
  undecided = []
  for gold in golds:
    verdict = _fast_verdict(answer, gold)
    if verdict:
      return True, []
    if verdict is None:
      undecided.append((answer, gold))
  return False, undecided


def math_verify_equal(answer: str, gold: str) -> bool:
  """math-verify's verdict on two normalised answers. Unbounded in time and memory: call it only
  inside a grader worker, which imports math-verify (the parent never does) and bounds each call."""
  import math_verify
  # The workers bound the time themselves (SIGALRM + kill), so math-verify's own alarms are off.
  parsed_gold = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=None)
  parsed_answer = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=None)
  if not parsed_gold or not parsed_answer:
    return False
  return bool(math_verify.verify(parsed_gold, parsed_answer, timeout_seconds=None))
