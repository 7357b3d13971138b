"""hf.export: a tiny random Qwen3 with Qwen3's real vocabulary (151,936) and tokenizer, exported
and read back by transformers (model, tokenizer, generation config) and by hf.load."""
import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import real_files
from opsd_jax import hf, model
from opsd_jax import tokenizer as tokenizer_lib
from opsd_jax.config import ModelConfig

VOCAB = 151_936  # Qwen3's embedding rows (the tokenizer has 151,669 tokens)
SHARD = 4_000_000  # bytes: the 19 MB embedding alone fills a shard, so the export is sharded
IM_END, ENDOFTEXT = 151645, 151643


def _cfg(tied):
  return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, mlp_dim=64, family="qwen3", tie_embeddings=tied,
                     rope_theta=1_000_000.0, norm_eps=1e-6, max_position=40960)


@functools.cache
def _init(cfg):
  return jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))  # eager init is slow


def _params(cfg, seed=0):
  """Our own init, every leaf moved off its default (norm scales are ones at init, so a swapped
  or dropped norm would otherwise go unseen)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jax.numpy.asarray(
      np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(np.float32)), _init(cfg))


def _texts():
  with open(real_files.data_file("gsm8k_test.jsonl")) as f:
    rows = [json.loads(next(f)) for _ in range(3)]
  return [r["question"] for r in rows], rows


@pytest.fixture(scope="module", params=["tied", "untied"])
def exported(request, tmp_path_factory, qwen3_tokenizer_dir):
  cfg = _cfg(request.param == "tied")
  params = _params(cfg)
  path = str(tmp_path_factory.mktemp(request.param) / "export")
  assert hf.export(path, cfg, params, tokenizer_dir=qwen3_tokenizer_dir,
                   max_shard_bytes=SHARD) == path
  return cfg, params, path


def _left_padded(tok, texts, T=32):
  tokens = np.full((len(texts), T), tok.pad_id, np.int32)
  mask = np.zeros((len(texts), T), bool)
  for b, text in enumerate(texts):
    ids = tok.encode(text)[:T - 7 * b]  # rows of different lengths: 32, 25, 18 tokens
    tokens[b, T - len(ids):] = ids
    mask[b, T - len(ids):] = True
  return tokens, mask


def test_transformers_logits_equal_ours(exported):
  cfg, params, path = exported
  files = os.listdir(path)
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 1 and "model.safetensors.index.json" in files
  assert not any(f.startswith(".") for f in os.listdir(os.path.dirname(path)))  # no temp dirs
  tok = tokenizer_lib.load("hf", path)
  tokens, mask = _left_padded(tok, _texts()[0])
  ours = np.asarray(model.forward(cfg, params, tokens, mask_BT=mask))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager")
  hf_model.eval()
  assert hf_model.config.tie_word_embeddings == cfg.tie_embeddings
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long),
                   position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  assert ref.shape == (3, 32, VOCAB)
  assert ref[mask].std() > 0.3  # not trivially small
  np.testing.assert_array_less(np.abs(ours - ref)[mask].max(), 1e-4)


def test_round_trip_through_hf_load(exported):
  cfg, params, path = exported
  cfg2, params2 = hf.load(path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_tokenizer_and_chat_template_match_ours(exported, qwen3_tokenizer_dir):
  _, _, path = exported
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert not os.path.islink(os.path.join(path, name))  # the content ships, not a link
    with open(os.path.join(path, name), "rb") as a, \
         open(os.path.join(qwen3_tokenizer_dir, name), "rb") as b:
      assert a.read() == b.read()
  ours = tokenizer_lib.load("hf", path)
  theirs = transformers.AutoTokenizer.from_pretrained(path)
  questions, rows = _texts()
  for text in questions + [rows[0]["answer"], "<think>\n2+2</think>\n\nThe answer is 4.<|im_end|>"]:
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
  template = tokenizer_lib.chat_template(ours, "checkpoint")
  messages = [{"role": "system", "content": "Reason step by step."},
              {"role": "user", "content": questions[0]}]
  for thinking in (True, False):
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=thinking)
    assert text == template.render(messages, thinking=thinking)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                     enable_thinking=thinking, return_dict=True)["input_ids"]
    assert ids == ours.encode(text)
  assert "<think>\n\n</think>" in text  # thinking off closes an empty thought


def test_generation_config_and_config_ids(exported):
  cfg, _, path = exported
  generation = transformers.GenerationConfig.from_pretrained(path)
  assert generation.eos_token_id == [IM_END, ENDOFTEXT]
  assert generation.pad_token_id == ENDOFTEXT and generation.temperature == 0.6  # Qwen3's own
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  assert config["dtype"] == config["torch_dtype"] == "float32"
  # as Qwen3's published config.json: eos <|im_end|>, bos <|endoftext|>; pad from the tokenizer
  assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == \
      (IM_END, ENDOFTEXT, ENDOFTEXT)
  hf_config = transformers.AutoConfig.from_pretrained(path)
  assert hf_config.eos_token_id == IM_END and hf_config.pad_token_id == ENDOFTEXT


def test_generation_config_made_from_tokenizer_when_absent(tmp_path, qwen3_tokenizer_dir):
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.symlink(os.path.join(qwen3_tokenizer_dir, name), tok_dir / name)
  cfg = _cfg(True)
  path = hf.export(str(tmp_path / "out"), cfg, _params(cfg), tokenizer_dir=str(tok_dir))
  assert "model.safetensors" in os.listdir(path)  # one file under the default shard size
  generation = transformers.GenerationConfig.from_pretrained(path)
  # tokenizer_config.json alone knows <|im_end|> as eos, <|endoftext|> as pad, no bos
  assert generation.eos_token_id == IM_END and generation.pad_token_id == ENDOFTEXT
  assert generation.bos_token_id is None
  # an explicit dict (e.g. the run's eos ids) is written as given
  path = hf.export(path, cfg, _params(cfg), tokenizer_dir=str(tok_dir),
                   generation_config={"eos_token_id": [IM_END, ENDOFTEXT], "top_k": 20})
  generation = transformers.GenerationConfig.from_pretrained(path)
  assert generation.eos_token_id == [IM_END, ENDOFTEXT] and generation.top_k == 20


def test_rerun_replaces_export_and_failure_keeps_the_old_one(tmp_path, qwen3_tokenizer_dir):
  cfg = _cfg(False)
  path = str(tmp_path / "export")
  hf.export(path, cfg, _params(cfg), tokenizer_dir=qwen3_tokenizer_dir, max_shard_bytes=SHARD)
  assert "model.safetensors.index.json" in os.listdir(path)
  new = _params(cfg, seed=5)
  hf.export(path, cfg, new, tokenizer_dir=qwen3_tokenizer_dir)  # unsharded this time
  assert sorted(os.listdir(path)) == ["config.json", "generation_config.json",
                                      "model.safetensors", "tokenizer.json",
                                      "tokenizer_config.json"]
  jax.tree.map(np.testing.assert_array_equal, new, hf.load(path)[1])
  # params not matching the config: refused, the earlier export untouched, no temp dir left
  bad = jax.tree.map(lambda x: x, new)
  bad["layers"]["mlp"]["up"]["kernel"] = bad["layers"]["mlp"]["up"]["kernel"][:, :, :5]
  with pytest.raises(hf.CheckpointFormatError, match="layers/mlp/up/kernel"):
    hf.export(path, cfg, bad, tokenizer_dir=qwen3_tokenizer_dir)
  jax.tree.map(np.testing.assert_array_equal, new, hf.load(path)[1])
  assert os.listdir(tmp_path) == ["export"]


def test_bad_tokenizer_dir_is_named_before_writing(tmp_path, qwen3_tokenizer_dir):
  cfg = _cfg(True)
  params = _params(cfg)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(hf.CheckpointFormatError, match=f"{empty}: no tokenizer.json"):
    hf.export(str(tmp_path / "out"), cfg, params, tokenizer_dir=str(empty))
  small = cfg.replace(vocab_size=1000)  # its params are never read: the check comes first
  with pytest.raises(hf.CheckpointFormatError, match="151669 tokens, more than the model's "
                                                     "vocab_size 1000"):
    hf.export(str(tmp_path / "out"), small, params, tokenizer_dir=qwen3_tokenizer_dir)
  assert sorted(os.listdir(tmp_path)) == ["empty"]
