"""One tokenizer interface over sentencepiece `.model` files and Hugging Face `tokenizer.json`,
and the chat templates that turn messages into the text the tokenizer encodes.

`encode` never adds BOS/EOS: the chat template writes every marker, and the sampler or the SFT
batcher appends EOS ids explicitly. Templates are either the checkpoint's own jinja template
(rendered the way transformers renders it, so our ids equal `apply_chat_template`'s) or the
"plain" template for models trained here, whose markers are single special tokens.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

# Markers of the plain template; the toy tokenizer makes each one a single piece.
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PLAIN_MARKERS = (USER, ASSISTANT, SYSTEM, END, THINK_OPEN, THINK_CLOSE)


KINDS = ("toy", "sentencepiece", "hf")  # toy: sentencepiece trained on the toy task (data/toy.py)
TEMPLATES = ("plain", "checkpoint")     # our single-token markers, or the checkpoint's jinja


class TokenizerError(ValueError):
  """A missing or malformed tokenizer file; the message names the file."""


class Tokenizer:
  """What every caller uses: ids <-> text, special ids, and (for HF dirs) the chat template.

  vocab_size: size of the id space (embedding rows needed); pad_id: id used for padding;
  eos_ids: every id that ends a response; bos_id: None when the model has none.
  """
  vocab_size: int
  pad_id: int
  eos_ids: tuple[int, ...]
  bos_id: int | None
  chat_template_source: str | None = None   # jinja source from tokenizer_config.json
  special_tokens: dict[str, str] = {}         # bos_token, eos_token, ... for the template

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def token_to_id(self, piece: str) -> int | None:
    raise NotImplementedError

  def _without_pad(self, ids) -> list[int]:
    return [int(i) for i in ids if int(i) != self.pad_id]


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model`. EOS: the model's own `</s>` if it has one, plus `<|end|>`."""

  def __init__(self, path: str):
    import sentencepiece as spm
    if not os.path.isfile(path):
      raise TokenizerError(f"sentencepiece model file not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"not a sentencepiece model: {path} ({e})") from e
    self.vocab_size = self.sp.GetPieceSize()
    eos = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []
    end = self.token_to_id(END)
    if end is not None and end not in eos:
      eos.append(end)
    if not eos:
      raise TokenizerError(f"{path}: no EOS piece (neither </s> nor {END})")
    self.eos_ids = tuple(eos)
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_ids[0]
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.special_tokens = {"eos_token": self.sp.IdToPiece(self.eos_ids[-1])}
    if self.bos_id is not None:
      self.special_tokens["bos_token"] = self.sp.IdToPiece(self.bos_id)

  def encode(self, text: str) -> list[int]:
    return list(self.sp.EncodeAsIds(text))

  def decode(self, ids) -> str:
    # DecodeIds drops control pieces (pad); user-defined symbols (our markers) come back as text.
    return self.sp.DecodeIds(self._without_pad(ids))

  def token_to_id(self, piece: str) -> int | None:
    i = self.sp.PieceToId(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else i


class HFTokenizer(Tokenizer):
  """A directory with tokenizer.json [+ tokenizer_config.json, generation_config.json]."""

  def __init__(self, directory: str):
    import tokenizers
    self.directory = directory
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise TokenizerError(f"no tokenizer.json in {directory}")
    try:
      self.tk = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type
      raise TokenizerError(f"malformed tokenizer file {path}: {e}") from e
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    self.chat_template_source = _template_source(directory, config)
    names = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                         "unk_token")}
    self.special_tokens = {k: v for k, v in names.items() if v is not None}
    self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
    eos = []
    if names["eos_token"] is not None:
      eos.append(self._required_id(names["eos_token"], "eos_token", directory))
    gen = _read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id")
    for i in ([gen] if isinstance(gen, int) else gen or []):
      if i not in eos:
        eos.append(int(i))
    if not eos:
      raise TokenizerError(f"{directory}: no eos_token in tokenizer_config.json and no "
                           "eos_token_id in generation_config.json")
    self.eos_ids = tuple(eos)
    self.pad_id = (self._required_id(names["pad_token"], "pad_token", directory)
                   if names["pad_token"] is not None else self.eos_ids[0])
    self.bos_id = (self._required_id(names["bos_token"], "bos_token", directory)
                   if names["bos_token"] is not None else None)

  def _required_id(self, piece, field, directory):
    i = self.tk.token_to_id(piece)
    if i is None:
      raise TokenizerError(f"{directory}/tokenizer_config.json: {field} {piece!r} is not in the "
                           "vocabulary")
    return i

  def encode(self, text: str) -> list[int]:
    return self.tk.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tk.decode(self._without_pad(ids), skip_special_tokens=False)

  def token_to_id(self, piece: str) -> int | None:
    return self.tk.token_to_id(piece)


def load(kind: str, path: str) -> Tokenizer:
  """kind "sentencepiece": a .model file; "hf": a directory holding tokenizer.json."""
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if kind == "hf":
    return HFTokenizer(path)
  raise TokenizerError(f"tokenizer kind must be 'sentencepiece' or 'hf', got {kind!r}")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_prefix: str, *,
                        user_defined_symbols: Sequence[str] = PLAIN_MARKERS,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a small sentencepiece model on `texts`; writes `out_prefix.model` atomically.

  Digits are split into single pieces; no dummy prefix and identity normalisation so that
  decode(encode(x)) == x and a prompt's ids followed by a completion's ids equal the ids of the
  concatenated text whenever the prompt ends with a marker. pad = 0, unk = 1, no BOS/EOS pieces:
  the template's `<|end|>` is the EOS.
  """
  import sentencepiece as spm
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_sentencepiece: no training text")
  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    tmp_prefix = os.path.join(tmp, "spm")
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_prefix=tmp_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=list(user_defined_symbols),
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, hard_vocab_limit=False,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    os.replace(tmp_prefix + ".model", out_prefix + ".model")
    os.replace(tmp_prefix + ".vocab", out_prefix + ".vocab")
  return SentencePieceTokenizer(out_prefix + ".model")


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


class ChatTemplate:
  """Messages -> text. `separator` joins the parts of a user message built by prompts.py;
  `name` identifies the template in errors."""
  separator = "\n"
  name = "chat template"

  def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
             thinking: bool = True) -> str:
    raise NotImplementedError

  def check_thinking_off(self, role: str = "prompt") -> None:
    """Raises unless thinking off renders a different prompt than thinking on: a template that
    ignores the switch (e.g. a Thinking-2507 model's) would silently give a thinking-on prompt."""
    on, off = self._generation_prompts
    if on == off:
      raise TokenizerError(f"{self.name}: a thinking-off {role} was asked for, but the template "
                           "renders the same prompt with enable_thinking off as on (it ignores "
                           "the thinking switch)")

  def closed_thought(self, thought: str) -> str:
    """The text that follows the thinking-on generation prompt for a finished `thought`:
    `<think>`, the thought, `</think>` with the template's own whitespace. With an empty thought
    it must be exactly what thinking off appends to the thinking-on prompt, so an answer after it
    follows the same closed-thought boundary as after the thinking-off prompt."""
    if THINK_OPEN in thought or THINK_CLOSE in thought:
      raise ValueError(f"the prefilled thought must not contain {THINK_OPEN} or {THINK_CLOSE}, "
                       f"got {thought!r}")
    self.check_thinking_off("prompt (to close a teacher's thought)")
    on, off = self._generation_prompts
    extra = off[len(on):] if off.startswith(on) else None
    if extra is None or not (extra.startswith(THINK_OPEN) and THINK_CLOSE in extra):
      raise TokenizerError(f"{self.name}: the thinking-off prompt is not the thinking-on one plus "
                           f"an empty {THINK_OPEN}...{THINK_CLOSE} thought (on ends {on[-30:]!r}, "
                           f"off ends {off[-30:]!r}), so a thinking-on teacher cannot close its "
                           "thought where a thinking-off student starts")
    form = self._thought_form
    if form.replace(_THOUGHT_SLOT, "") != extra:
      raise TokenizerError(f"{self.name}: thinking off appends {extra!r} to the thinking-on "
                           f"prompt, but an empty closed thought renders as "
                           f"{form.replace(_THOUGHT_SLOT, '')!r}")
    return form.replace(_THOUGHT_SLOT, thought)

  @functools.cached_property
  def _generation_prompts(self) -> tuple[str, str]:
    """The probe conversation's prompt with thinking on and with thinking off."""
    return tuple(self.render(_PROBE, add_generation_prompt=True, thinking=t)
                 for t in (True, False))

  @functools.cached_property
  def _thought_form(self) -> str:
    """The closed thought with `_THOUGHT_SLOT` where the thought goes."""
    raise NotImplementedError


_PROBE = ({"role": "user", "content": "What is 1 + 1?"},)
_THOUGHT_SLOT = "\x00thought\x00"
_ANSWER_SLOT = "\x00answer\x00"


class PlainTemplate(ChatTemplate):
  """For models trained here: `<|user|>question<|end|><|assistant|>`, and with thinking off the
  generation prompt closes an empty thought, `<think></think>`, like Qwen3. No newlines: the toy
  tokenizer is trained without them."""
  separator = " "
  name = "plain chat template"
  _thought_form = THINK_OPEN + _THOUGHT_SLOT + THINK_CLOSE

  def render(self, messages, *, add_generation_prompt=True, thinking=True):
    markers = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    parts = []
    for i, m in enumerate(messages):
      role = m.get("role")
      if role not in markers:
        raise ValueError(f"messages[{i}].role must be one of {sorted(markers)}, got {role!r}")
      parts.append(f"{markers[role]}{m['content']}{END}")
    if add_generation_prompt:
      parts.append(ASSISTANT if thinking else ASSISTANT + THINK_OPEN + THINK_CLOSE)
    return "".join(parts)


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (HF assistant-mask tag): renders its body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja's own tojson escapes HTML characters; transformers overrides it the same way.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


class JinjaTemplate(ChatTemplate):
  """A checkpoint's jinja chat template, rendered in a sandbox as transformers does
  (trim_blocks, lstrip_blocks, loopcontrols, raise_exception, tojson, strftime_now); `thinking`
  is passed as `enable_thinking` (Qwen3). A closed thought is written the way the template
  writes an assistant turn's `reasoning_content` (Qwen3: `<think>\\n` thought
  `\\n</think>\\n\\n`)."""

  def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
               name: str = "jinja chat template"):
    self.name = name
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
      self.template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise TokenizerError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
    self.special_tokens = dict(special_tokens or {})

  def render(self, messages, *, add_generation_prompt=True, thinking=True):
    messages = [_alias_reasoning(m) for m in messages]
    return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                enable_thinking=thinking, **self.special_tokens)

  @functools.cached_property
  def _thought_form(self) -> str:
    # The probe conversation answered with a slot thought and a slot answer: what lies between
    # the thinking-on generation prompt and the answer is the template's closed thought.
    head = self.render(_PROBE, add_generation_prompt=True, thinking=True)
    turn = {"role": "assistant", "content": _ANSWER_SLOT, "reasoning_content": _THOUGHT_SLOT}
    full = self.render([*_PROBE, turn], add_generation_prompt=False, thinking=True)
    form = full[len(head):].partition(_ANSWER_SLOT)[0] if full.startswith(head) else ""
    if not (form.startswith(THINK_OPEN) and _THOUGHT_SLOT in form
            and THINK_CLOSE in form.partition(_THOUGHT_SLOT)[2]):
      raise TokenizerError(f"{self.name}: an assistant turn's reasoning_content is not rendered "
                           f"as {THINK_OPEN}...{THINK_CLOSE} right after the generation prompt, "
                           "so a thought cannot be prefilled")
    return form


def _alias_reasoning(message):
  # transformers copies `thinking`/`reasoning` into `reasoning_content`, which Qwen3 reads.
  for key in ("reasoning_content", "thinking", "reasoning"):
    if message.get(key) is not None:
      return {"thinking": message[key], **message, "reasoning_content": message[key]}
  return message


def chat_template(tok: Tokenizer, kind: str = "plain") -> ChatTemplate:
  """kind "plain": our own markers (the tokenizer must know them); "checkpoint": the jinja
  template from the tokenizer's tokenizer_config.json."""
  if kind == "plain":
    missing = [m for m in PLAIN_MARKERS if tok.token_to_id(m) is None]
    if missing:
      raise TokenizerError(f"plain chat template needs the markers {missing} in the vocabulary")
    return PlainTemplate()
  if kind == "checkpoint":
    if not tok.chat_template_source:
      raise TokenizerError("chat_template='checkpoint' but the tokenizer has no chat_template "
                           "in tokenizer_config.json (or chat_template.jinja)")
    where = getattr(tok, "directory", None)
    return JinjaTemplate(tok.chat_template_source, tok.special_tokens,
                         name=f"chat template of {where}" if where else "checkpoint chat template")
  raise TokenizerError(f"chat template kind must be 'plain' or 'checkpoint', got {kind!r}")


def _read_json(path):
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"malformed JSON in {path}: line {e.lineno}: {e.msg}") from e


def _template_source(directory, config):
  source = config.get("chat_template")
  if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
    named = {t.get("name"): t.get("template") for t in source}
    source = named.get("default")
  jinja_file = os.path.join(directory, "chat_template.jinja")
  if source is None and os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      source = f.read()
  return source


def _token_content(value):
  if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
    return value.get("content")
  return value
