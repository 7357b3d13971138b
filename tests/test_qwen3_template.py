"""Student and teacher prompts on Qwen3's REAL tokenizer files, against transformers'
AutoTokenizer on the same directory: each role rendered in its own thinking mode, the closed
prefilled thought of a thinking-on teacher scoring a thinking-off student, the first scored token
at the same place in both contexts, the special ids from the checkpoint files, and a clear error
for a template that ignores enable_thinking (a Thinking-2507-style one)."""
import json
import os
import re

import pytest

import real_files
from opsd_jax import prompts
from opsd_jax import tokenizer as tokenizer_lib

QUESTION = "What is 2 + 2?"
REFERENCE = "2 + 2 = 4, so the answer is \\boxed{4}."
THOUGHT = "I have read the reference solution. Now I solve it my own way."
COMPLETIONS = {False: "The answer is \\boxed{4}.<|im_end|>",
               True: "<think>\nOkay, 2 + 2 = 4. Let me check: yes.\n</think>\n\nThe answer is "
                     "\\boxed{4}.<|im_end|>"}
MODES = [(s, t) for s in (True, False) for t in (True, False)]


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir):
  import transformers
  tok = tokenizer_lib.load("hf", qwen3_tokenizer_dir)
  return (tok, tokenizer_lib.chat_template(tok, "checkpoint"),
          transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir))


def _hf_text(hf_tok, content, thinking):
  return hf_tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=thinking)


def _hf_ids(hf_tok, text):
  return hf_tok.encode(text, add_special_tokens=False)


def _texts(template, s, t):
  student = prompts.student_text(template, QUESTION, thinking=s)
  teacher = prompts.teacher_text(template, QUESTION, REFERENCE, "full", thinking=t,
                                 completion_thinking=s, thought=THOUGHT)
  return student, teacher


@pytest.mark.parametrize("s,t", MODES)
def test_prompts_equal_transformers_plus_documented_suffix(qwen3, s, t):
  tok, template, hf_tok = qwen3
  student, teacher = _texts(template, s, t)
  assert student == _hf_text(hf_tok, prompts.student_content(QUESTION), s)
  rendered = _hf_text(hf_tok, prompts.teacher_content(QUESTION, REFERENCE, "full"), t)
  closed = f"<think>\n{THOUGHT}\n</think>\n\n" if t and not s else ""
  assert teacher == rendered + closed
  assert rendered.endswith("<|im_start|>assistant\n" if t else
                           "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  # our ids are transformers' ids, for the texts and for its own tokenized rendering
  assert prompts.student(tok, template, QUESTION, thinking=s) == _hf_ids(hf_tok, student)
  teacher_ids = prompts.teacher(tok, template, QUESTION, REFERENCE, "full", thinking=t,
                                completion_thinking=s, thought=THOUGHT)
  assert teacher_ids == _hf_ids(hf_tok, teacher)
  if not closed:
    messages = [{"role": "user", "content": prompts.teacher_content(QUESTION, REFERENCE)}]
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                     enable_thinking=t)
    assert teacher_ids == list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("s", [True, False])
def test_teacher_thinking_changes_the_teacher(qwen3, s):
  # issue #17 item 3: before, the teacher got the student's suffix whatever its own mode
  _, template, _ = qwen3
  assert _texts(template, s, True)[1] != _texts(template, s, False)[1]


@pytest.mark.parametrize("s,t", MODES)
def test_first_scored_token_lines_up(qwen3, s, t):
  tok, template, hf_tok = qwen3
  student_text, teacher_text = _texts(template, s, t)
  student = prompts.student(tok, template, QUESTION, thinking=s)
  teacher = prompts.teacher(tok, template, QUESTION, REFERENCE, "full", thinking=t,
                            completion_thinking=s, thought=THOUGHT)
  completion = tok.encode(COMPLETIONS[s])
  assert completion == _hf_ids(hf_tok, COMPLETIONS[s])
  assert completion[-1] == hf_tok.eos_token_id
  for prompt, text in ((student, student_text), (teacher, teacher_text)):
    ids = prompt + completion
    # the appended ids are what the whole text tokenizes to, so the first scored token is the
    # completion's first token at offset len(prompt) in both contexts
    assert ids == _hf_ids(hf_tok, text + COMPLETIONS[s])
    assert ids[len(prompt)] == completion[0]
  end_think = hf_tok.convert_tokens_to_ids(["</think>", "ĊĊ"])  # `</think>` `\n\n`
  if not s:
    # a thinking-off answer is scored right after `</think>\n\n` in both contexts
    assert student[-2:] == teacher[-2:] == end_think
    assert completion[0] == hf_tok.encode("The", add_special_tokens=False)[0]
  else:
    assert completion[0] == hf_tok.convert_tokens_to_ids("<think>")
    if t:
      assert teacher_text.endswith("<|im_start|>assistant\n")
    else:  # student on / teacher off: the student's `<think>` follows the teacher's empty thought
      assert teacher[-2:] == end_think


def test_special_tokens_from_checkpoint_files(qwen3, qwen3_tokenizer_dir):
  import transformers
  tok, _, hf_tok = qwen3
  generation = transformers.GenerationConfig.from_pretrained(qwen3_tokenizer_dir)
  assert tok.eos_ids == (151645, 151643)
  assert list(tok.eos_ids) == generation.eos_token_id
  assert tok.eos_ids[0] == hf_tok.eos_token_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
  assert tok.pad_id == 151643 == hf_tok.pad_token_id
  assert tok.bos_id is None and hf_tok.bos_token_id is None
  with open(real_files.CONFIGS["8b"]) as f:
    model_vocab = json.load(f)["vocab_size"]
  assert tok.vocab_size == 151669 == len(hf_tok)
  assert model_vocab == 151936 and tok.vocab_size <= model_vocab
  for piece, i in (("<think>", 151667), ("</think>", 151668)):
    assert tok.token_to_id(piece) == i == hf_tok.convert_tokens_to_ids(piece)
    assert tok.encode(piece) == [i] == _hf_ids(hf_tok, piece)


_GENERATION_BLOCK = """    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}"""


@pytest.fixture(scope="module")
def thinking_2507_dir(qwen3_tokenizer_dir, tmp_path_factory):
  """Qwen3's files with a Thinking-2507-style template: the generation prompt always opens
  `<think>\\n`, whatever enable_thinking says."""
  directory = str(tmp_path_factory.mktemp("qwen3_thinking_2507"))
  with open(os.path.join(qwen3_tokenizer_dir, "tokenizer_config.json")) as f:
    config = json.load(f)
  assert _GENERATION_BLOCK in config["chat_template"]
  config["chat_template"] = config["chat_template"].replace(
      _GENERATION_BLOCK, "    {{- '<|im_start|>assistant\\n<think>\\n' }}")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  for name in ("tokenizer.json", "generation_config.json"):
    os.symlink(os.path.join(qwen3_tokenizer_dir, name), os.path.join(directory, name))
  return directory


def test_template_ignoring_thinking_switch_raises(thinking_2507_dir):
  import transformers
  hf_tok = transformers.AutoTokenizer.from_pretrained(thinking_2507_dir)
  template = tokenizer_lib.chat_template(tokenizer_lib.load("hf", thinking_2507_dir),
                                         "checkpoint")
  content = prompts.student_content(QUESTION)
  on, off = (_hf_text(hf_tok, content, t) for t in (True, False))
  assert on == off and on.endswith("<|im_start|>assistant\n<think>\n")  # the switch is ignored
  assert prompts.student_text(template, QUESTION, thinking=True) == on
  where = re.escape(f"chat template of {thinking_2507_dir}")
  with pytest.raises(tokenizer_lib.TokenizerError, match=f"{where}: a thinking-off prompt "
                     r"\(thinking=False\) was asked for.*ignores the thinking switch"):
    prompts.student_text(template, QUESTION, thinking=False)
  with pytest.raises(tokenizer_lib.TokenizerError, match=f"{where}: a thinking-off prompt"):
    prompts.teacher_text(template, QUESTION, REFERENCE, thinking=False)
  with pytest.raises(tokenizer_lib.TokenizerError, match=f"{where}: a thinking-off completion "
                     r"\(completion_thinking=False\)"):
    prompts.teacher_text(template, QUESTION, REFERENCE, thinking=True, completion_thinking=False,
                         thought=THOUGHT)
