"""The ONE place student and teacher prompts are built (SFT, RLVR, OPSD and evaluation all call
these), so the two roles can never drift onto different templates (METHOD.md, traps).

A prompt is a list of token ids; the completion starts at `len(ids)`. The sampler appends the
completion after the prompt, so the same completion ids sit right after both prompts. What sits
between the assistant header and the first completion token (the "generation suffix") follows
the thinking mode the completion was sampled in, i.e. the student's: with Qwen3, thinking off
writes an empty `<think>\\n\\n</think>\\n\\n` there. A teacher rendered with a different thinking
flag gets the student's suffix, otherwise its first scored token would follow a different
boundary (the known `<think>` misalignment bug); its thinking flag still governs the rest of
its prompt.

Teacher context (METHOD.md, Paper A's template paraphrased): the problem; "Here is a reference
solution:" and the reference; an instruction to understand it and solve in its own words; the
student's answer instruction. "answer_only" shows only the final answer; "none" is the student's
context (the control).
"""
from __future__ import annotations

from opsd_jax.tokenizer import ChatTemplate, Tokenizer

ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
REFERENCE_INTRO = "Here is a reference solution:"
ANSWER_INTRO = "Here is the final answer:"
OWN_WORDS = ("After understanding the reference solution, please try to solve this problem "
             "using your own approach.")
CONTEXTS = ("full", "answer_only", "none")


def instruction_texts() -> list[str]:
  """Every fixed sentence a prompt may contain (for training a tokenizer on the prompts)."""
  return [ANSWER_INSTRUCTION, REFERENCE_INTRO, ANSWER_INTRO, OWN_WORDS]


def student_content(question: str, separator: str = "\n") -> str:
  return separator.join([question, ANSWER_INSTRUCTION])


def teacher_content(question: str, reference: str | None, context: str = "full",
                    answer: str | None = None, separator: str = "\n") -> str:
  if context not in CONTEXTS:
    raise ValueError(f"teacher context must be one of {CONTEXTS}, got {context!r}")
  if context == "none":
    return student_content(question, separator)
  if context == "full":
    if not reference:
      raise ValueError("teacher context 'full' needs a reference solution, got none")
    privileged = [REFERENCE_INTRO, reference]
  else:
    if answer is None or answer == "":
      raise ValueError("teacher context 'answer_only' needs the gold answer (answer=...)")
    privileged = [ANSWER_INTRO, f"\\boxed{{{answer}}}"]
  return separator.join([question, *privileged, OWN_WORDS, ANSWER_INSTRUCTION])


def render(template: ChatTemplate, content: str, *, thinking: bool = True,
           completion_thinking: bool | None = None) -> str:
  """The prompt text for one user message, ending with the generation suffix of
  `completion_thinking` (default: `thinking`)."""
  messages = [{"role": "user", "content": content}]
  completion_thinking = thinking if completion_thinking is None else completion_thinking
  text = template.render(messages, add_generation_prompt=True, thinking=thinking)
  if completion_thinking == thinking:
    return text
  head = template.render(messages, add_generation_prompt=False, thinking=thinking)
  if not text.startswith(head):
    raise ValueError("chat template: the rendering with a generation prompt does not extend the "
                     "rendering without one, so the generation suffix cannot be swapped")
  head_c = template.render(messages, add_generation_prompt=False, thinking=completion_thinking)
  full_c = template.render(messages, add_generation_prompt=True, thinking=completion_thinking)
  if not full_c.startswith(head_c):
    raise ValueError("chat template: the rendering with a generation prompt does not extend the "
                     "rendering without one, so the generation suffix cannot be swapped")
  return head + full_c[len(head_c):]


def student_text(template: ChatTemplate, question: str, thinking: bool = True) -> str:
  return render(template, student_content(question, template.separator), thinking=thinking)


def teacher_text(template: ChatTemplate, question: str, reference: str | None,
                 context: str = "full", answer: str | None = None, thinking: bool = True,
                 completion_thinking: bool | None = None) -> str:
  content = teacher_content(question, reference, context, answer, template.separator)
  return render(template, content, thinking=thinking, completion_thinking=completion_thinking)


def student(tok: Tokenizer, template: ChatTemplate, question: str, thinking: bool = True
            ) -> list[int]:
  """The student's prompt ids; the completion starts at len(ids)."""
  return tok.encode(student_text(template, question, thinking))


def teacher(tok: Tokenizer, template: ChatTemplate, question: str, reference: str | None,
            context: str = "full", answer: str | None = None, thinking: bool = True,
            completion_thinking: bool | None = None) -> list[int]:
  """The teacher's prompt ids. Pass the student's thinking flag as `completion_thinking` when
  it differs from the teacher's, so the completion follows the same `<think>` boundary."""
  return tok.encode(teacher_text(template, question, reference, context, answer, thinking,
                                 completion_thinking))
