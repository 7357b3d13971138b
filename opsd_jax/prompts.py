"""The ONE place student and teacher prompts are built (SFT, RLVR, OPSD and evaluation all call
these), so the two roles can never drift onto different templates (docs/method.md, traps).

A prompt is a list of token ids; the completion starts at `len(ids)`. The sampler appends the
completion after the prompt, so the same completion ids sit right after both prompts. Each role
is rendered with its OWN thinking mode (Qwen3's enable_thinking only changes the generation
suffix: on `<|im_start|>assistant\\n`, off the same plus an empty `<think>\\n\\n</think>\\n\\n`),
and where the completion starts is made explicit:

  student | teacher | teacher prompt
  --------+---------+----------------------------------------------------------------------
  on      | on      | the template's rendering (the completion opens its own thought)
  off     | off     | the template's rendering (the completion follows an empty thought)
  off     | on      | the thinking-on rendering + a closed prefilled thought, `<think>\\n`
          |         | thought `\\n</think>\\n\\n` (plain template: `<think>`thought`</think>`), so
          |         | the student's answer is scored after a closed thought in both contexts
          |         | (the OPSD reference's close_teacher_thinking_before_scoring)
  on      | off     | the teacher's thinking-off rendering: its suffix closes an empty thought,
          |         | and the student's completion, which opens `<think>`, follows it

The thought is `thought=` (opsd.teacher_thought). A template that renders the same prompt with
thinking off as on (e.g. a Thinking-2507 model's, always opening `<think>`) raises a
TokenizerError when either role asks for thinking off, and so does a thinking-on teacher with a
thinking-off student when the template or tokenizer has no `<think>`/`</think>`.

Teacher context (docs/method.md, Paper A's template paraphrased): the problem; "Here is a reference
solution:" and the reference; an instruction to understand it and solve in its own words; the
student's answer instruction. "answer_only" shows only the final answer (the first, when a list
of acceptable answers is given); "none" is the student's context (the control).
"""
from __future__ import annotations

from collections.abc import Sequence

from opsd_jax.tokenizer import THINK_CLOSE, THINK_OPEN, ChatTemplate, Tokenizer, TokenizerError

ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
REFERENCE_INTRO = "Here is a reference solution:"
ANSWER_INTRO = "Here is the final answer:"
OWN_WORDS = ("After understanding the reference solution, please try to solve this problem "
             "using your own approach.")
# The default prefilled thought (opsd.teacher_thought's default); listed in instruction_texts so
# the toy tokenizer, trained on them, encodes it without unknown pieces.
TEACHER_THOUGHT = ("I have read the reference solution and understood it. Now I write the "
                   "solution in my own words.")
CONTEXTS = ("full", "answer_only", "none")


def instruction_texts() -> list[str]:
  """Every fixed sentence a prompt may contain (for training a tokenizer on the prompts)."""
  return [ANSWER_INSTRUCTION, REFERENCE_INTRO, ANSWER_INTRO, OWN_WORDS, TEACHER_THOUGHT]


def student_content(question: str, separator: str = "\n") -> str:
  return separator.join([question, ANSWER_INSTRUCTION])


def teacher_content(question: str, reference: str | None, context: str = "full",
                    answer: str | Sequence[str] | None = None, separator: str = "\n") -> str:
  """`answer`: the gold answer, or a list of acceptable ones (answer_only shows the first)."""
  if isinstance(answer, (list, tuple)):
    answer = answer[0] if answer else None
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
           completion_thinking: bool | None = None, thought: str | None = None) -> str:
  """The prompt text for one user message in the `thinking` mode of its reader, followed by the
  completion sampled in `completion_thinking` (default: `thinking`); see the module doc.
  `thought` is prefilled (and closed) only when the reader thinks and the completion does not."""
  messages = [{"role": "user", "content": content}]
  completion_thinking = thinking if completion_thinking is None else completion_thinking
  if not thinking:
    template.check_thinking_off("prompt (thinking=False)")
  elif not completion_thinking:
    template.check_thinking_off("completion (completion_thinking=False)")
  text = template.render(messages, add_generation_prompt=True, thinking=thinking)
  if thinking and not completion_thinking:
    if thought is None:
      raise ValueError("a thinking-on teacher scoring a thinking-off student needs the prefilled "
                       "thought= (opsd.teacher_thought)")
    text += template.closed_thought(thought)
  return text


def student_text(template: ChatTemplate, question: str, thinking: bool = True) -> str:
  return render(template, student_content(question, template.separator), thinking=thinking)


def teacher_text(template: ChatTemplate, question: str, reference: str | None,
                 context: str = "full", answer: str | Sequence[str] | None = None,
                 thinking: bool = True, completion_thinking: bool | None = None,
                 thought: str | None = None) -> str:
  content = teacher_content(question, reference, context, answer, template.separator)
  return render(template, content, thinking=thinking, completion_thinking=completion_thinking,
                thought=thought)


def student(tok: Tokenizer, template: ChatTemplate, question: str, thinking: bool = True
            ) -> list[int]:
  """The student's prompt ids; the completion starts at len(ids)."""
  return tok.encode(student_text(template, question, thinking))


def teacher(tok: Tokenizer, template: ChatTemplate, question: str, reference: str | None,
            context: str = "full", answer: str | Sequence[str] | None = None,
            thinking: bool = True, completion_thinking: bool | None = None,
            thought: str | None = None) -> list[int]:
  """The teacher's prompt ids in its own `thinking` mode. Pass the student's mode as
  `completion_thinking`; a thinking-on teacher of a thinking-off student ends with `thought`,
  closed, so both score the answer right after `</think>` (module doc)."""
  if thinking and completion_thinking is False:
    missing = [m for m in (THINK_OPEN, THINK_CLOSE) if tok.token_to_id(m) is None]
    if missing:
      raise TokenizerError(f"a thinking-on teacher scoring a thinking-off student closes a "
                           f"thought, but the tokenizer has no {' / '.join(missing)} token")
  return tok.encode(teacher_text(template, question, reference, context, answer, thinking,
                                 completion_thinking, thought))


def teacher_settings(opsd_cfg) -> dict:
  """`teacher` / `teacher_text` keyword arguments from the experiment's opsd section: the
  context, the teacher's thinking mode, the student's (the completion's) and the closed thought."""
  o = opsd_cfg
  return dict(context=o.teacher_context, thinking=o.teacher_thinking,
              completion_thinking=o.student_thinking, thought=o.teacher_thought)
