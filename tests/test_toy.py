"""The toy arithmetic task, checked by re-deriving everything from the text it generates."""
import json
import operator
import os
import re

import numpy as np
import pytest

from opsd_jax import prompts
from opsd_jax import tokenizer as tokenizer_lib
from opsd_jax.data import toy, toy_stats

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
WORDS = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def solve_question(question):
  """Independent solver: parse the English question and evaluate it left to right."""
  m = re.fullmatch(r"Start with (\d+)\. (.*) What is the result\?", question)
  value, values = int(m.group(1)), []
  for word, number in re.findall(r"(Add|Subtract|Multiply by) (\d+)\.", m.group(2)):
    value = OPS[WORDS[word]](value, int(number))
    values.append(value)
  return value, values


def boxed(text):
  return re.findall(r"\\boxed\{(\d+)\}", text)[-1]


@pytest.fixture(scope="module")
def splits():
  return toy.make_splits(seed=7, num_train=3000, num_test=300, difficulty=1)


def test_deterministic_and_disjoint(splits):
  train, test = splits
  assert toy.make_splits(7, 3000, 300, 1) == (train, test)
  assert toy.make_splits(8, 3000, 300, 1)[0] != train
  train_q = {p["question"] for p in train}
  test_q = {p["question"] for p in test}
  assert len(train_q) == 3000 and len(test_q) == 300 and not train_q & test_q
  assert toy.make_splits(7, 100, 300, 1)[1] == test  # the test set does not depend on num_train


def test_answers_references_and_traces(splits):
  train, test = splits
  kinds = {"none": 0, "caught": 0, "uncaught": 0}
  for p in train + test:
    gold, values = solve_question(p["question"])
    assert p["answer"] == str(gold)
    assert all(0 <= v <= toy.DIFFICULTIES[1].max_value for v in values)
    ref_steps = STEP.findall(p["reference"])
    assert [int(c) for *_, c in ref_steps] == values
    assert all(OPS[op](int(a), int(b)) == int(c) for a, op, b, c in ref_steps)
    trace = p["trace"]
    assert trace.startswith("<think> ") and " </think> The answer is \\boxed{" in trace
    assert (boxed(trace) == p["answer"]) == p["trace_correct"]
    assert p["concise_trace"] == f"<think> {p['reference']} </think> The answer is \\boxed{{{gold}}}."
    wrong_steps = [s for s in STEP.findall(trace) if OPS[s[1]](int(s[0]), int(s[2])) != int(s[3])]
    catches = trace.count(", not ")
    kinds[p["slip"]] += 1
    if p["slip"] == "none":
      assert not wrong_steps and not catches and p["trace_correct"]
    elif p["slip"] == "caught":
      assert len(wrong_steps) == 1 and catches == 1 and p["trace_correct"]
    else:  # an uncaught slip carries through (re-checks of that step repeat it)
      assert wrong_steps and not catches and not p["trace_correct"]
    # thinking off: each step once, no thought, no re-check; a slip (even one the verbose trace
    # caught) is carried to the end
    short = p["short_trace"]
    short_steps = STEP.findall(short)
    assert "<think>" not in short and not any(ph in short for ph in toy.RECHECK_PHRASES)
    assert short == " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in short_steps) + \
        f" The answer is \\boxed{{{short_steps[-1][3]}}}."
    assert len(short_steps) == len(values) and short_steps[0][0] == p["question"].split()[2][:-1]
    assert all(int(short_steps[i][3]) == int(short_steps[i + 1][0])
               for i in range(len(short_steps) - 1))
    short_wrong = [s for s in short_steps if OPS[s[1]](int(s[0]), int(s[2])) != int(s[3])]
    assert len(short_wrong) == (p["slip"] != "none")
    assert p["short_trace_correct"] == (boxed(short) == p["answer"]) == (p["slip"] == "none")
    if p["slip"] != "none":  # the same wrong step as the verbose trace wrote first
      assert short_wrong[0] == wrong_steps[0]
    assert p["concise_short_trace"] == f"{p['reference']} The answer is \\boxed{{{gold}}}."
    phrases = sum(trace.count(ph) for ph in toy.RECHECK_PHRASES)
    assert p["num_rechecks"] == phrases - catches
    assert 0 <= p["num_rechecks"] <= 4
  n = len(train) + len(test)
  assert 0.10 < (kinds["caught"] + kinds["uncaught"]) / n < 0.20  # slip_rate 0.15
  assert 0.3 < kinds["caught"] / (kinds["caught"] + kinds["uncaught"]) < 0.7


@pytest.mark.parametrize("difficulty", [2, 3])
def test_harder_difficulties(difficulty):
  train, _ = toy.make_splits(0, 300, 0, difficulty)
  d = toy.DIFFICULTIES[difficulty]
  for p in train:
    gold, values = solve_question(p["question"])
    assert p["answer"] == str(gold) and len(values) == d.num_ops
    assert all(0 <= v <= d.max_value for v in values)
  if difficulty == 3:
    assert any("Multiply by" in p["question"] for p in train)
  with pytest.raises(ValueError, match="difficulty must be one of"):
    toy.make_splits(0, 1, 1, 9)


@pytest.fixture(scope="module")
def tok(splits, tmp_path_factory):
  return toy.build_tokenizer(splits[0], str(tmp_path_factory.mktemp("toy")))


def test_tokenizer_cached_and_pieces(splits, tok):
  mtime = os.path.getmtime(tok.path)
  again = toy.build_tokenizer(splits[0], os.path.dirname(tok.path))
  assert again.path == tok.path and os.path.getmtime(tok.path) == mtime
  for marker in tokenizer_lib.PLAIN_MARKERS:
    assert len(tok.encode(marker)) == 1
  for digit in "0123456789":
    assert tok.token_to_id(digit) is not None
  p = splits[0][0]
  assert tok.decode(tok.encode(p["trace"])) == p["trace"]
  lengths = [len(tok.encode(q["trace"])) + 1 for q in splits[0]]
  assert max(lengths) <= 150


def test_sft_examples(splits, tok):
  train = splits[0][:1000]
  template = tokenizer_lib.chat_template(tok, "plain")
  examples = toy.sft_examples(train, tok, template, concise_share=0.3, seed=1)
  assert examples == toy.sft_examples(train, tok, template, concise_share=0.3, seed=1)
  end = tok.eos_ids[0]
  concise = 0
  for p, (prompt, completion) in zip(train, examples):
    assert completion[-1] == end and end not in completion[:-1]
    text = tok.decode(completion[:-1])
    if prompts.REFERENCE_INTRO in tok.decode(prompt):  # teacher prompt -> concise trace
      concise += 1
      assert tok.decode(prompt) == prompts.teacher_text(template, p["question"], p["reference"])
      assert p["reference"] in tok.decode(prompt)
      assert text == p["concise_trace"]
    else:
      assert text == p["trace"]
      assert tok.decode(prompt) == prompts.student_text(template, p["question"])
  assert 0.25 < concise / len(train) < 0.35
  # thinking_off_share: that share rendered thinking off (prompt closes an empty thought, short
  # trace); the concise/verbose draw per problem stays the same, and share 0 = the old examples
  mixed = toy.sft_examples(train, tok, template, concise_share=0.3, seed=1,
                           thinking_off_share=0.4)
  assert toy.sft_examples(train, tok, template, concise_share=0.3, seed=1,
                          thinking_off_share=0.0) == examples
  off = 0
  for p, (prompt, completion), (old_prompt, old_completion) in zip(train, mixed, examples):
    prompt_text, text = tok.decode(prompt), tok.decode(completion[:-1])
    teacher = prompts.REFERENCE_INTRO in prompt_text
    assert teacher == (prompts.REFERENCE_INTRO in tok.decode(old_prompt))
    if prompt_text.endswith("<|assistant|><think></think>"):
      off += 1
      if teacher:
        assert prompt_text == prompts.teacher_text(template, p["question"], p["reference"],
                                                   thinking=False)
        assert text == f"{p['reference']} The answer is \\boxed{{{p['answer']}}}."
      else:
        assert prompt_text == prompts.student_text(template, p["question"], thinking=False)
        assert text == p["short_trace"]
    else:
      assert (prompt, completion) == (old_prompt, old_completion)
  assert 0.35 < off / len(train) < 0.45
  all_off = toy.sft_examples(train[:20], tok, template, thinking_off_share=1.0)
  assert all(tok.decode(pr).endswith("<think></think>") for pr, _ in all_off)
  with pytest.raises(ValueError, match="thinking_off_share"):
    toy.sft_examples(train[:2], tok, template, thinking_off_share=1.5)


def test_toy_stats_match_definitions(capsys):
  result = toy_stats.main(["--seed", "3", "--n", "400"])
  printed = json.loads(capsys.readouterr().out)
  assert printed == result
  problems, _ = toy.make_splits(3, 400, 0, 1)
  assert result["problems"] == 400
  assert result["slip_rate"] == round(np.mean([p["slip"] != "none" for p in problems]), 4)
  wrong = np.mean([boxed(p["trace"]) != solve_question(p["question"])[0].__str__()
                   for p in problems])
  assert result["wrong_final_answer_rate"] == round(wrong, 4)
  assert result["rechecks_per_trace"]["mean"] == round(np.mean([p["num_rechecks"]
                                                                for p in problems]), 3)
  assert sum(result["rechecks_per_trace"]["histogram"].values()) == 400
  chars = [len(p["trace"]) for p in problems]
  assert result["trace_chars"]["mean"] == round(np.mean(chars), 2)
  assert result["trace_chars"]["max"] == max(chars)
  assert result["trace_tokens"]["mean"] > result["concise_tokens"]["mean"]
