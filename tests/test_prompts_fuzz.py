"""Fuzzing the prompt builder (prompts.py) with hypothesis: random and adversarial questions,
references and answers (chat-template markers, special tokens, Jinja syntax, control and
right-to-left characters, very long text), through the plain template with the toy
sentencepiece tokenizer and the Qwen3-like checkpoint template with a BPE tokenizer.

For every input: no crash (only the documented ValueErrors: context 'full' without a reference,
'answer_only' without an answer, a prefilled thought holding `<think>`/`</think>`); ids are ints
inside the vocabulary; each prompt ends with the generation suffix of its own thinking mode, as
independent references give it (the plain template's marker pieces; transformers' rendering of
the Qwen3 template), the teacher's followed by the closed thought when it thinks and the student
does not, so a thinking-off student's answer follows `</think>` (the same ids) in both contexts;
the completion re-tokenises the same when encoded together with the prompt text. Counts go to
<pytest basetemp>/fuzz_counts.json ("prompts").
"""
from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd_jax import prompts
from opsd_jax import tokenizer as tokenizer_lib
from opsd_jax.data import toy
from pipeline_helpers import record_fuzz_counts
from test_prompts import qwen  # noqa: F401  (the Qwen3-like tokenizer fixture)

COUNTS = collections.Counter()
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

PIECES = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<think>", "</think>",
          "<|im_start|>", "<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "{{", "}}",
          "{%", "%}", "{{ raise_exception('x') }}", "{% for m in messages %}", "{#", "\\boxed{",
          "}", "\n", "\n\n", "\r\n", "\t", " ", "  ", "\x00", "\u202e", "\ufeff", "é", "中文",
          "🙂", "Start with 17.", "Add 25.", "17 + 25 = 42.", "What is the result?", "####",
          "Here is a reference solution:", prompts.ANSWER_INSTRUCTION, "$", "\\", "\"", "'"]
pieces = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
texts = st.one_of(st.text(max_size=200), pieces,
                  st.tuples(st.text(max_size=50), pieces).map("".join),
                  st.text(st.sampled_from("0123456789 +-=.\n"), min_size=500, max_size=3000))
maybe_empty = st.one_of(st.just(""), st.just("   "), texts)
answers = st.one_of(st.none(), st.just(""), texts, st.lists(texts, max_size=3))
thoughts = st.one_of(st.just(prompts.TEACHER_THOUGHT), st.just(""), texts)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(tmp_path_factory):
  yield
  path = record_fuzz_counts(tmp_path_factory, "prompts", COUNTS)
  print(f"\nprompt fuzz counts ({path}):", dict(sorted(COUNTS.items())))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  train, _ = toy.make_splits(0, 200, 0)
  tok = toy.build_tokenizer(train, str(tmp_path_factory.mktemp("toy")))
  return tok, tokenizer_lib.chat_template(tok, "plain"), None


def _reference_suffix(which, hf_tok, content, thinking) -> str:
  """The generation suffix after the user turn, from a source other than prompts.py."""
  if which == "plain":  # PlainTemplate's documented form: <|end|><|assistant|>[<think></think>]
    return tokenizer_lib.END + tokenizer_lib.ASSISTANT + (
        "" if thinking else tokenizer_lib.THINK_OPEN + tokenizer_lib.THINK_CLOSE)
  messages = [{"role": "user", "content": content}]
  full, head = (hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=g,
                                           enable_thinking=thinking) for g in (True, False))
  assert full.startswith(head)
  return "<|im_end|>\n" + full[len(head):]


def _check_ids(tok, ids):
  assert isinstance(ids, list) and ids
  assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)


def _build(fn, *args, **kwargs):
  """Calls a prompt builder; a documented ValueError is returned as None (and counted)."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    message = str(e)
    documented = ("needs a reference solution" in message or "needs the gold answer" in message
                  or "must not contain" in message)
    assert documented, f"undocumented ValueError: {message}"
    COUNTS["documented_errors"] += 1
    return None


@pytest.mark.parametrize("which", ["plain", "qwen"])
def test_prompt_builder_fuzz(request, which):
  tok, template, hf_tok = request.getfixturevalue(which)
  completion_text = "The answer is \\boxed{42}."
  completion = tok.encode(completion_text)

  @settings(FUZZ, max_examples=1500 if which == "plain" else 800)
  @given(question=texts, reference=maybe_empty, answer=answers,
         context=st.sampled_from(prompts.CONTEXTS), student_thinking=st.booleans(),
         teacher_thinking=st.booleans(), thought=thoughts)
  def check(question, reference, answer, context, student_thinking, teacher_thinking, thought):
    COUNTS[f"{which}_examples"] += 1
    student = prompts.student(tok, template, question, student_thinking)
    _check_ids(tok, student)
    teacher = _build(prompts.teacher, tok, template, question, reference, context, answer,
                     thinking=teacher_thinking, completion_thinking=student_thinking,
                     thought=thought)
    first = answer[0] if isinstance(answer, list) and answer else answer
    marked = "<think>" in thought or "</think>" in thought
    assert (teacher is None) == ((context == "full" and not reference)
                                 or (context == "answer_only" and not first)
                                 or (teacher_thinking and not student_thinking and marked))
    if teacher is None:
      return
    _check_ids(tok, teacher)
    student_text = prompts.student_text(template, question, student_thinking)
    teacher_text = prompts.teacher_text(template, question, reference, context, answer,
                                        teacher_thinking, student_thinking, thought)
    suffix = _reference_suffix(which, hf_tok, prompts.student_content(
        question, template.separator), student_thinking)
    teacher_suffix = _reference_suffix(which, hf_tok, prompts.student_content(
        question, template.separator), teacher_thinking)
    if teacher_thinking and not student_thinking:
      teacher_suffix += (f"<think>{thought}</think>" if which == "plain"
                         else f"<think>\n{thought}\n</think>\n\n")
    assert student_text.endswith(suffix) and teacher_text.endswith(teacher_suffix)
    suffix_ids = tok.encode(suffix)
    assert student[-len(suffix_ids):] == suffix_ids
    if not student_thinking:  # the answer follows the same closed-thought ids in both
      close = tok.encode(suffix[suffix.index("</think>"):])
      assert student[-len(close):] == teacher[-len(close):] == close
    for prompt, text in ((student, student_text), (teacher, teacher_text)):
      assert tok.encode(text + completion_text) == prompt + completion
    COUNTS[f"{which}_aligned"] += 1

  check()
  assert COUNTS[f"{which}_aligned"] >= 200
