"""Student and teacher prompts: rendered through the checkpoint's template exactly as
transformers renders them, and completion tokens aligned after both prompts."""
import pytest

from opsd_jax import prompts
from opsd_jax import tokenizer as tokenizer_lib
from opsd_jax.data import toy
from test_tokenizer import make_qwen3_like_dir

QUESTION = "What is 17 + 25?"
REFERENCE = "17 + 25 = 42."


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  import transformers
  directory = make_qwen3_like_dir(str(tmp_path_factory.mktemp("qwen3_like")))
  tok = tokenizer_lib.load("hf", directory)
  return tok, tokenizer_lib.chat_template(tok, "checkpoint"), \
      transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  train, _ = toy.make_splits(0, 300, 0)
  tok = toy.build_tokenizer(train, str(tmp_path_factory.mktemp("toy")))
  return tok, tokenizer_lib.chat_template(tok, "plain")


def _hf_prompt_ids(hf_tok, content, thinking):
  out = hf_tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                   add_generation_prompt=True, enable_thinking=thinking)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_contents():
  student = prompts.student_content(QUESTION)
  assert student == QUESTION + "\n" + prompts.ANSWER_INSTRUCTION
  full = prompts.teacher_content(QUESTION, REFERENCE, "full")
  parts = full.split("\n")
  assert parts == [QUESTION, "Here is a reference solution:", REFERENCE, prompts.OWN_WORDS,
                   prompts.ANSWER_INSTRUCTION]
  only = prompts.teacher_content(QUESTION, REFERENCE, "answer_only", answer="42")
  assert REFERENCE not in only and "\\boxed{42}" in only
  assert prompts.teacher_content(QUESTION, REFERENCE, "none") == student
  with pytest.raises(ValueError, match="needs the gold answer"):
    prompts.teacher_content(QUESTION, REFERENCE, "answer_only")
  with pytest.raises(ValueError, match="needs a reference"):
    prompts.teacher_content(QUESTION, "", "full")
  with pytest.raises(ValueError, match="context must be one of"):
    prompts.teacher_content(QUESTION, REFERENCE, "hint")


@pytest.mark.parametrize("thinking", [True, False])
def test_prompts_equal_transformers_rendering(qwen, thinking):
  tok, template, hf_tok = qwen
  assert prompts.student(tok, template, QUESTION, thinking) == _hf_prompt_ids(
      hf_tok, prompts.student_content(QUESTION), thinking)
  for context in prompts.CONTEXTS:
    content = prompts.teacher_content(QUESTION, REFERENCE, context, answer="42")
    assert prompts.teacher(tok, template, QUESTION, REFERENCE, context, answer="42",
                           thinking=thinking) == _hf_prompt_ids(hf_tok, content, thinking)


COMPLETIONS = {True: "<think>\n17 + 25 = 42. Wait, let me double-check: yes.\n</think>\n\n"
                     "The answer is \\boxed{42}.",
               False: "The answer is \\boxed{42}."}
THOUGHT = "I read the reference. Now I solve it myself."


def _expected_teacher_suffix(which, student_thinking, teacher_thinking):
  """What the teacher's prompt ends with after its user turn, written out by hand: its own
  generation suffix, plus the closed thought when it thinks and the student does not."""
  if which == "plain":
    return tokenizer_lib.END + tokenizer_lib.ASSISTANT + (
        "" if teacher_thinking else "<think></think>") + (
        f"<think>{THOUGHT}</think>" if teacher_thinking and not student_thinking else "")
  return "<|im_end|>\n<|im_start|>assistant\n" + (
      "" if teacher_thinking else "<think>\n\n</think>\n\n") + (
      f"<think>\n{THOUGHT}\n</think>\n\n" if teacher_thinking and not student_thinking else "")


@pytest.mark.parametrize("student_thinking", [True, False])
@pytest.mark.parametrize("teacher_thinking", [True, False])
@pytest.mark.parametrize("which", ["qwen", "plain"])
def test_completion_aligns_after_both_prompts(request, which, student_thinking, teacher_thinking):
  tok, template = request.getfixturevalue(which)[:2]
  completion_text = COMPLETIONS[student_thinking]
  thought = THOUGHT
  if which == "plain":
    completion_text = completion_text.replace("\n", " ")
  completion = tok.encode(completion_text) + [tok.eos_ids[0]]
  student = prompts.student(tok, template, QUESTION, student_thinking)
  teacher = prompts.teacher(tok, template, QUESTION, REFERENCE, "full",
                            thinking=teacher_thinking, completion_thinking=student_thinking,
                            thought=thought)
  teacher_text = prompts.teacher_text(template, QUESTION, REFERENCE, "full",
                                      thinking=teacher_thinking,
                                      completion_thinking=student_thinking, thought=thought)
  eos_text = tok.decode([tok.eos_ids[0]])
  for prompt, text in ((student, prompts.student_text(template, QUESTION, student_thinking)),
                       (teacher, teacher_text)):
    ids = prompt + completion
    # the completion sits at the same place relative to each prompt's end and re-tokenises the
    # same way when the text is encoded whole
    assert ids[len(prompt):] == completion
    assert tok.decode(ids) == text + completion_text + eos_text
    assert tok.encode(text + completion_text) == ids[:-1]
  # the teacher is rendered in its own mode; a thinking-off student's answer follows a closed
  # thought in both contexts
  assert teacher_text.endswith(_expected_teacher_suffix(which, student_thinking,
                                                        teacher_thinking))
  other = prompts.teacher_text(template, QUESTION, REFERENCE, "full",
                               thinking=not teacher_thinking,
                               completion_thinking=student_thinking, thought=thought)
  assert other != teacher_text
  if not student_thinking:
    tail = tok.encode(tokenizer_lib.THINK_CLOSE + ("" if which == "plain" else "\n\n"))
    assert tail[0] == tok.token_to_id(tokenizer_lib.THINK_CLOSE)
    assert student[-len(tail):] == teacher[-len(tail):] == tail


def test_thinking_on_teacher_of_thinking_off_student(qwen):
  # Before: the thinking-on teacher got the student's empty thought, i.e. it was thinking off.
  tok, template, _ = qwen
  student_text = prompts.student_text(template, QUESTION, thinking=False)
  on = prompts.teacher_text(template, QUESTION, REFERENCE, thinking=True)
  off = prompts.teacher_text(template, QUESTION, REFERENCE, thinking=False)
  closed = prompts.teacher_text(template, QUESTION, REFERENCE, thinking=True,
                                completion_thinking=False, thought=THOUGHT)
  assert student_text.endswith("assistant\n<think>\n\n</think>\n\n")
  assert on.endswith("assistant\n") and off == on + "<think>\n\n</think>\n\n"
  assert closed == on + f"<think>\n{THOUGHT}\n</think>\n\n"
  with pytest.raises(ValueError, match="needs the prefilled thought"):
    prompts.teacher_text(template, QUESTION, REFERENCE, thinking=True, completion_thinking=False)
  with pytest.raises(ValueError, match="must not contain"):
    prompts.teacher_text(template, QUESTION, REFERENCE, thinking=True, completion_thinking=False,
                         thought="a </think> b")
  # the thought is only used where the teacher thinks and the student does not
  assert prompts.teacher_text(template, QUESTION, REFERENCE, thinking=False,
                              completion_thinking=True, thought=THOUGHT) == off


def test_answer_list_uses_first(qwen):
  _, template, _ = qwen
  assert prompts.teacher_content(QUESTION, REFERENCE, "answer_only", answer=["42", "42.0"]) == \
      prompts.teacher_content(QUESTION, REFERENCE, "answer_only", answer="42")
  with pytest.raises(ValueError, match="needs the gold answer"):
    prompts.teacher_content(QUESTION, REFERENCE, "answer_only", answer=[])


def test_toy_tokenizer_encodes_default_thought(plain):
  from opsd_jax import config
  tok, template = plain
  thought = config.default_config().opsd.teacher_thought
  assert thought == prompts.TEACHER_THOUGHT
  text = prompts.teacher_text(template, QUESTION, REFERENCE, thinking=True,
                              completion_thinking=False, thought=thought)
  assert text.endswith(f"<|assistant|><think>{thought}</think>")
  assert tok.decode(tok.encode(text)) == text  # no unknown pieces


def test_plain_prompts_are_single_marker_tokens(plain):
  tok, template = plain
  ids = prompts.student(tok, template, QUESTION, thinking=False)
  tail = [tok.token_to_id(m) for m in (tokenizer_lib.END, tokenizer_lib.ASSISTANT,
                                        tokenizer_lib.THINK_OPEN, tokenizer_lib.THINK_CLOSE)]
  assert ids[-4:] == tail
  assert ids[0] == tok.token_to_id(tokenizer_lib.USER)
