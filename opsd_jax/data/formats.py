"""Math data layouts: detect a row's layout by its keys and normalise it to one record.

A record is {"question": str, "reference": str | None, "answer": str | list[str]}: the problem,
the worked solution the OPSD teacher sees (None for a test row that has none) and the gold
answer (a list only when the row gives several acceptable answers).

Layouts (LAYOUTS), each recognised by its keys:
  gsm8k         `question`, `answer` = worked solution ending in "#### N" (calculator
                annotations <<...>> stripped from the reference; commas dropped from N).
  math          Hendrycks MATH: `problem`, `solution`; the answer is the solution's last
                \\boxed{} (an `answer` field, when a row has one, wins).
  math500       `problem`, `answer` (`solution` optional): MATH500, OpenR1-Math.
  aime          Qwen2.5-Math evaluation files (AIME, AMC): `question` and a numeric answer, often
                `problem` too (it wins); integers lose leading zeros ("007" -> "7"), floats read as
                the number they are (27.0 -> "27").
  dapo          DAPO-Math-17k: `prompt` = chat list, `reward_model.ground_truth`; no reference.
  openthoughts  `conversations` / `messages` = chat list (OpenThoughts, OpenR1): the user turn is
                the problem, the assistant turn the reference, its last \\boxed{} the answer.
  fields        any other layout, through an explicit mapping {problem, solution, answer} of the
                row's keys (dots reach into nested objects and lists: "reward_model.ground_truth").
"""
from __future__ import annotations

import math
import re

from opsd_jax import verify

LAYOUTS = ("gsm8k", "math", "math500", "aime", "dapo", "openthoughts", "fields")
FORMATS = ("auto",) + LAYOUTS  # what config's data.format accepts
FIELD_ROLES = ("problem", "solution", "answer")

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>
_INTEGER = re.compile(r"[+-]?\d+")
_INTEGRAL_DECIMAL = re.compile(r"([+-]?\d+)\.0*")
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt")
# DAPO-Math-17k wraps every problem in its own "Answer:" instruction; our prompts add theirs.
_DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
              "should be of the form Answer: $Answer (without quotes) where $Answer is the "
              "answer to the problem.\n\n")
_DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


class DataError(ValueError):
  """A bad data file or row; the one-line message names the file and line or row."""


class RowError(ValueError):
  """One row that cannot be used; `reason` is the short cause the report counts it under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason} ({detail})" if detail else reason)
    self.reason = reason


def detect(keys, row=None) -> str | None:
  """The layout a row with these keys has, or None; `row` (optional) breaks the one tie,
  question + answer: a "#### N" answer is GSM8K, a bare number the Qwen2.5-Math layout."""
  keys = set(keys)
  if "problem" in keys:
    if "question" in keys:
      return "aime"
    if "answer" in keys:
      return "math500"
    if "solution" in keys:
      return "math"
    return None
  if "prompt" in keys and "reward_model" in keys:
    return "dapo"
  if "conversations" in keys or "messages" in keys:
    return "openthoughts"
  if "question" in keys and "answer" in keys:
    answer = None if row is None else row.get("answer")
    if isinstance(answer, str) and "####" not in answer or _is_number(answer):
      return "aime"
    return "gsm8k"
  return None


def check_fields(fields) -> dict[str, str] | None:
  """A mapping with its empty roles dropped, or None when it names nothing; DataError when it
  names an unknown role or lacks the problem or the answer."""
  if not fields:
    return None
  if not isinstance(fields, dict):
    raise DataError(f"fields must be a dict of {FIELD_ROLES}, got {type(fields).__name__}")
  unknown = sorted(set(fields) - set(FIELD_ROLES))
  if unknown:
    raise DataError(f"fields: unknown role(s) {unknown}; roles are {FIELD_ROLES}")
  named = {k: v for k, v in fields.items() if v}
  if not named:
    return None
  missing = [k for k in ("problem", "answer") if k not in named]
  if missing:
    raise DataError(f"fields: {missing} must name the row's key(s) too (got {named})")
  return named


def normalize(row, layout: str, fields: dict[str, str] | None = None) -> dict:
  """One row (a dict) in `layout` -> a record; RowError says what is wrong."""
  if not isinstance(row, dict):
    raise RowError("not an object", f"a JSON {type(row).__name__}")
  if layout == "fields":
    if not fields:
      raise DataError("layout 'fields' needs a fields mapping {problem, solution, answer}")
    return _from_fields(row, fields)
  if layout not in _NORMALIZERS:
    raise DataError(f"data format must be one of {FORMATS}, got {layout!r}")
  return _NORMALIZERS[layout](row)


def _gsm8k(row):
  question, solution = _text(row, "question"), _text(row, "answer")
  if "####" not in solution:
    raise RowError("field 'answer' has no '#### <final answer>'", "GSM8K form")
  reasoning, final = solution.rsplit("####", 1)
  answer = final.strip().replace(",", "")
  if not answer:
    raise RowError("field 'answer' has nothing after '####'")
  return _record(question, _CALCULATOR.sub("", reasoning), answer)


def _math(row):
  solution = _text(row, "solution")
  if _present(row, "answer"):
    answer = _answer(row["answer"], "answer")
  else:
    answer = _boxed(solution, "solution")
  return _record(_text(row, "problem"), solution, answer)


def _math500(row):
  return _record(_text(row, "problem"), _optional_text(row, "solution"),
                 _answer(_required(row, "answer"), "answer"))


def _aime(row):
  key = "problem" if _present(row, "problem") else "question"
  answer = _answer(_required(row, "answer"), "answer", integers=True)
  return _record(_text(row, key), _optional_text(row, "solution"), answer)


def _dapo(row):
  question = _last_turn(_required(row, "prompt"), "prompt", _USER_ROLES)
  if question.startswith(_DAPO_HEAD) and question.endswith(_DAPO_TAIL):
    question = question[len(_DAPO_HEAD):-len(_DAPO_TAIL)]
  reward = _required(row, "reward_model")
  if not isinstance(reward, dict):
    raise RowError("field 'reward_model' is not an object", type(reward).__name__)
  answer = _answer(_required(reward, "ground_truth", "reward_model.ground_truth"),
                   "reward_model.ground_truth")
  return _record(question, None, answer)


def _openthoughts(row):
  key = "conversations" if "conversations" in row else "messages"
  turns = _required(row, key)
  question = _last_turn(turns, key, _USER_ROLES, first=True)
  reference = _last_turn(turns, key, _ASSISTANT_ROLES, first=True)
  return _record(question, reference, _boxed(reference, f"{key}: assistant turn"))


_NORMALIZERS = {"gsm8k": _gsm8k, "math": _math, "math500": _math500, "aime": _aime,
                "dapo": _dapo, "openthoughts": _openthoughts}


def _from_fields(row, fields):
  question = _str_value(_lookup(row, fields["problem"]), fields["problem"])
  reference = None
  if "solution" in fields:
    value = _lookup(row, fields["solution"], required=False)
    reference = None if value is None else _str_value(value, fields["solution"], empty_ok=True)
  answer = _answer(_lookup(row, fields["answer"]), fields["answer"])
  return _record(question, reference or None, answer)


def _lookup(row, dotted, required=True):
  """row["a"]["b"] for "a.b"; an integer part indexes a list ("messages.0.content")."""
  value = row
  for part in dotted.split("."):
    if isinstance(value, dict) and part in value:
      value = value[part]
    elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(
        part) < len(value):
      value = value[int(part)]
    elif required:
      raise RowError(f"missing field {dotted!r}")
    else:
      return None
  if value is None and required:
    raise RowError(f"field {dotted!r} is empty")
  return value


def _record(question, reference, answer):
  return {"question": question.strip(),
          "reference": reference.strip() if reference is not None else None,
          "answer": answer}


def _present(row, key):
  value = row.get(key)
  return value is not None and not (isinstance(value, str) and not value.strip())


def _required(row, key, name=None):
  if key not in row:
    raise RowError(f"missing field {name or key!r}")
  if row[key] is None:
    raise RowError(f"field {name or key!r} is empty")
  return row[key]


def _text(row, key):
  return _str_value(_required(row, key), key)


def _optional_text(row, key):
  value = row.get(key)
  return None if value is None else _str_value(value, key, empty_ok=True) or None


def _str_value(value, name, empty_ok=False):
  if not isinstance(value, str):
    raise RowError(f"field {name!r} is not a string", type(value).__name__)
  if not empty_ok and not value.strip():
    raise RowError(f"field {name!r} is empty")
  try:  # JSON escapes can spell lone surrogates ("\ud800"); tokenizers cannot encode them
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RowError(f"field {name!r} is not valid Unicode",
                   f"a lone surrogate at character {e.start}") from None
  return value


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_text(value, name):
  if isinstance(value, float):
    if not math.isfinite(value):
      raise RowError(f"field {name!r} is not a finite number", repr(value))
    return str(int(value)) if value.is_integer() else repr(value)
  return str(value)


def _answer(value, name, integers=False):
  """A gold answer: a string, a number, or a list of them (several acceptable answers)."""
  if isinstance(value, (list, tuple)):
    answers = [_one_answer(v, name, integers) for v in value]
    if not answers:
      raise RowError(f"field {name!r} is empty", "an empty list")
    answers = list(dict.fromkeys(answers))
    return answers[0] if len(answers) == 1 else answers
  return _one_answer(value, name, integers)


def _one_answer(value, name, integers):
  if _is_number(value):
    return _number_text(value, name)
  text = _str_value(value, name).strip()
  if integers:  # AIME's "007" is the integer 7; AMC's "27.0" the integer 27
    whole = _INTEGER.fullmatch(text) or _INTEGRAL_DECIMAL.fullmatch(text)
    if whole:
      return str(int(whole.group(1) if whole.re is _INTEGRAL_DECIMAL else whole.group(0)))
  return text


def _boxed(text, name):
  answer = verify.extract_answer(text, max_chars=len(text) + 1)
  if answer is None or "\\boxed" not in text and "\\fbox" not in text:
    raise RowError("no \\boxed{} answer", f"in {name}")
  return answer


def _last_turn(turns, name, roles, first=False):
  """The content of the last (or first) turn whose role is in `roles`."""
  if not isinstance(turns, list):
    raise RowError(f"field {name!r} is not a chat list", type(turns).__name__)
  found = None
  for turn in turns:
    if not isinstance(turn, dict):
      raise RowError(f"field {name!r} has a turn that is not an object")
    role = turn.get("role", turn.get("from"))
    if role in roles:
      found = turn.get("content", turn.get("value"))
      if found is None:
        raise RowError(f"field {name!r}: a {role} turn has no content/value")
      if first:
        break
  if found is None:
    raise RowError(f"field {name!r} has no {roles[0]} turn")
  return _str_value(found, f"{name}: {roles[0]} turn")
