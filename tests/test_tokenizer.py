"""Tokenizers and chat templates, checked against transformers' apply_chat_template and
sentencepiece itself."""
import json
import os

import jinja2
import pytest

from opsd_jax import tokenizer as tokenizer_lib

# A Qwen3-style template written for these tests: system, user, assistant turns with
# reasoning_content, the last assistant turn keeps its thought, and the generation prompt
# closes an empty thought when enable_thinking is false.
QWEN3_LIKE_TEMPLATE = """
{%- if messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {%- set content = message.content %}
    {%- set reasoning = '' %}
    {%- if message.reasoning_content is string %}
      {%- set reasoning = message.reasoning_content %}
    {%- elif '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {%- if loop.last and reasoning %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
    {%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
  {%- elif message.role != 'system' or not loop.first %}
    {{- raise_exception('Unknown role: ' + message.role) }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
  {%- endif %}
{%- endif %}
"""

CORPUS = [
    "What is 17 + 25? Please reason step by step, and put your final answer within \\boxed{}.",
    "Here is a reference solution: 17 + 25 = 42. The answer is \\boxed{42}.",
    "Wait, let me double-check: 17 + 25 = 42. Hmm, alternatively we could count.",
    "After understanding the reference solution, please try to solve this problem.",
    "A train leaves at 3 pm and travels 60 km per hour. How far does it go by 5 pm?",
] * 20


def make_qwen3_like_dir(directory):
  """A BPE tokenizer.json trained here + tokenizer_config.json with the Qwen3-like template."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(CORPUS, trainer)
  tk.add_tokens([tokenizers.AddedToken("<think>", special=False),
                 tokenizers.AddedToken("</think>", special=False)])
  os.makedirs(directory, exist_ok=True)
  tk.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN3_LIKE_TEMPLATE,
               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, f)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")]},
              f)
  return directory


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  return make_qwen3_like_dir(str(tmp_path_factory.mktemp("qwen3_like")))


def _hf_ids(hf_tok, messages, **kw):
  out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
  ids = out["input_ids"] if hasattr(out, "keys") else out
  return list(ids)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "You are a careful solver."},
     {"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "user", "content": "What is 17 + 25?"},
     {"role": "assistant", "content": "<think>\n17 + 25 = 42.\n</think>\n\nThe answer is 42."},
     {"role": "user", "content": "Wait, let me double-check: and 42 + 1?"}],
    [{"role": "user", "content": "Hmm?"},
     {"role": "assistant", "content": "Here is \\boxed{42}.", "reasoning_content": "count"}],
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_checkpoint_template_matches_transformers(qwen_dir, thinking, conversation):
  import transformers
  hf_tok = transformers.AutoTokenizer.from_pretrained(qwen_dir)
  tok = tokenizer_lib.load("hf", qwen_dir)
  template = tokenizer_lib.chat_template(tok, "checkpoint")
  messages = CONVERSATIONS[conversation]
  add_gen = messages[-1]["role"] == "user"
  ours = template.render(messages, add_generation_prompt=add_gen, thinking=thinking)
  theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen,
                                      enable_thinking=thinking)
  assert ours == theirs
  assert tok.encode(ours) == _hf_ids(hf_tok, messages, add_generation_prompt=add_gen,
                                     enable_thinking=thinking)
  if add_gen:
    assert ours.endswith("assistant\n" if thinking else "<think>\n\n</think>\n\n")


def test_template_raise_exception_and_syntax_error(qwen_dir):
  template = tokenizer_lib.chat_template(tokenizer_lib.load("hf", qwen_dir), "checkpoint")
  with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: robot"):
    template.render([{"role": "robot", "content": "x"}])
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not parse"):
    tokenizer_lib.JinjaTemplate("{% if %}")


def test_template_is_sandboxed():
  evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
  with pytest.raises(jinja2.exceptions.SecurityError):
    tokenizer_lib.JinjaTemplate(evil).render([{"role": "user", "content": "x"}])


def test_hf_tokenizer_ids_match_transformers(qwen_dir):
  import transformers
  hf_tok = transformers.AutoTokenizer.from_pretrained(qwen_dir)
  tok = tokenizer_lib.load("hf", qwen_dir)
  text = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<think>\nok\n</think>"
  assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
  assert tok.decode(tok.encode(text)) == text
  assert tok.eos_ids == (hf_tok.convert_tokens_to_ids("<|im_end|>"),
                         hf_tok.convert_tokens_to_ids("<|endoftext|>"))
  assert tok.pad_id == hf_tok.pad_token_id
  assert tok.bos_id is None
  assert tok.vocab_size == len(hf_tok)
  assert tok.token_to_id("<think>") == hf_tok.convert_tokens_to_ids("<think>")
  assert tok.token_to_id("no-such-piece") is None
  # decode skips pad
  assert tok.decode([tok.pad_id] + tok.encode("17") + [tok.pad_id]) == "17"


def test_hf_errors(tmp_path, qwen_dir):
  with pytest.raises(tokenizer_lib.TokenizerError, match="no tokenizer.json"):
    tokenizer_lib.load("hf", str(tmp_path))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text("{not json")
  with pytest.raises(tokenizer_lib.TokenizerError, match="malformed tokenizer file"):
    tokenizer_lib.load("hf", str(bad))
  wrong_eos = tmp_path / "wrong_eos"
  wrong_eos.mkdir()
  (wrong_eos / "tokenizer.json").write_text(open(os.path.join(qwen_dir, "tokenizer.json")).read())
  (wrong_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
  with pytest.raises(tokenizer_lib.TokenizerError, match="eos_token '<|missing|>'"):
    tokenizer_lib.load("hf", str(wrong_eos))
  with pytest.raises(tokenizer_lib.TokenizerError, match="no chat_template"):
    tokenizer_lib.chat_template(_no_template(tmp_path, qwen_dir), "checkpoint")
  with pytest.raises(tokenizer_lib.TokenizerError, match="kind must be"):
    tokenizer_lib.load("bpe", qwen_dir)


def _no_template(tmp_path, qwen_dir):
  d = tmp_path / "no_template"
  d.mkdir()
  (d / "tokenizer.json").write_text(open(os.path.join(qwen_dir, "tokenizer.json")).read())
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  return tokenizer_lib.load("hf", str(d))


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "toy")
  texts = [f"<|user|>What is {a} + {b}?<|end|><|assistant|><think> {a} + {b} = {a + b}. "
           f"</think> The answer is \\boxed{{{a + b}}}.<|end|>" for a in range(40) for b in
           range(0, 90, 7)]
  return tokenizer_lib.train_sentencepiece(texts, 120, prefix)


def test_sentencepiece_pieces(spm_tok):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=spm_tok.path)
  for marker in tokenizer_lib.PLAIN_MARKERS:  # each marker is one piece
    assert spm_tok.encode(marker) == [sp.PieceToId(marker)]
  text = "<think> 1234 + 987 = 2221. </think>"
  pieces = [sp.IdToPiece(i) for i in spm_tok.encode(text)]
  digits = [p.lstrip("\u2581") for p in pieces if any(c.isdigit() for c in p)]
  assert digits == list("12349872221")  # every digit its own piece
  assert spm_tok.decode(spm_tok.encode(text)) == text
  assert spm_tok.eos_ids == (sp.PieceToId("<|end|>"),)
  assert spm_tok.pad_id == 0 and spm_tok.bos_id is None
  assert spm_tok.vocab_size == sp.GetPieceSize()
  assert spm_tok.decode([0, *spm_tok.encode("12"), 0]) == "12"
  # a prompt ending in a marker followed by a completion tokenises like the whole text
  prompt, completion = "<|user|>What is 3 + 4?<|end|><|assistant|>", "<think> 3 + 4 = 7."
  assert spm_tok.encode(prompt) + spm_tok.encode(completion) == spm_tok.encode(prompt + completion)
  reloaded = tokenizer_lib.load("sentencepiece", spm_tok.path)
  assert reloaded.encode(text) == spm_tok.encode(text)


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match="not found"):
    tokenizer_lib.load("sentencepiece", str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"\x00garbage")
  with pytest.raises(tokenizer_lib.TokenizerError, match="not a sentencepiece model"):
    tokenizer_lib.load("sentencepiece", str(junk))


def test_plain_template(spm_tok):
  template = tokenizer_lib.chat_template(spm_tok, "plain")
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
              {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
  assert template.render(messages) == (
      "<|system|>S<|end|><|user|>Q<|end|><|assistant|>A<|end|><|user|>Q2<|end|><|assistant|>")
  assert template.render(messages[:2], thinking=False).endswith(
      "<|end|><|assistant|><think></think>")
  assert template.render(messages[:2], add_generation_prompt=False) == "<|system|>S<|end|><|user|>Q<|end|>"
  with pytest.raises(ValueError, match=r"messages\[0\].role"):
    template.render([{"role": "tool", "content": "x"}])


def test_plain_template_needs_markers(qwen_dir):
  with pytest.raises(tokenizer_lib.TokenizerError, match="needs the markers"):
    tokenizer_lib.chat_template(tokenizer_lib.load("hf", qwen_dir), "plain")


def test_thinking_switch_and_closed_thought(qwen_dir, spm_tok):
  from opsd_jax import prompts
  tok = tokenizer_lib.load("hf", qwen_dir)
  template = tokenizer_lib.chat_template(tok, "checkpoint")
  template.check_thinking_off()  # the Qwen3-like template honours the switch
  assert template.closed_thought("ok") == "<think>\nok\n</think>\n\n"
  assert tokenizer_lib.PlainTemplate().closed_thought("ok") == "<think>ok</think>"
  # a template that ignores enable_thinking: thinking off is refused, naming the template
  ignores = tokenizer_lib.JinjaTemplate(
      QWEN3_LIKE_TEMPLATE.replace("enable_thinking is false", "false"), name="ignoring template")
  with pytest.raises(tokenizer_lib.TokenizerError,
                     match="ignoring template: a thinking-off prompt.*ignores the thinking switch"):
    prompts.student_text(ignores, "Q", thinking=False)
  with pytest.raises(tokenizer_lib.TokenizerError, match="ignoring template: a thinking-off "
                     "completion"):
    prompts.teacher_text(ignores, "Q", "R", thinking=True, completion_thinking=False,
                         thought="ok")
  assert prompts.student_text(ignores, "Q") == template.render(
      [{"role": "user", "content": prompts.student_content("Q")}])
  # thinking off that is not an empty <think>...</think> thought: no place to close a thought
  no_think = tokenizer_lib.JinjaTemplate(
      QWEN3_LIKE_TEMPLATE.replace("'<think>\\n\\n</think>\\n\\n'", "'/no_think\\n'"),
      name="no-think template")
  assert prompts.student_text(no_think, "Q", thinking=False).endswith("assistant\n/no_think\n")
  with pytest.raises(tokenizer_lib.TokenizerError, match="no-think template: the thinking-off "
                     "prompt is not the thinking-on one plus an empty <think>"):
    prompts.teacher_text(no_think, "Q", "R", thinking=True, completion_thinking=False,
                         thought="ok")
  # a tokenizer without <think>/</think> tokens cannot hold the closed thought
  no_marker = tokenizer_lib.train_sentencepiece(
      ["<|user|>What is 1 + 2?<|end|><|assistant|>3<|end|>"] * 50, 60,
      os.path.join(os.path.dirname(spm_tok.path), "no_think"),
      user_defined_symbols=[tokenizer_lib.USER, tokenizer_lib.ASSISTANT, tokenizer_lib.END])
  with pytest.raises(tokenizer_lib.TokenizerError, match="tokenizer has no <think> / </think>"):
    prompts.teacher(no_marker, tokenizer_lib.PlainTemplate(), "Q", "R", thinking=True,
                    completion_thinking=False, thought="ok")
