"""hf.load / hf.save against transformers (PyTorch CPU, float32) on tiny random-init models."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from opsd_jax import hf, model, parallel

VOCAB, T = 128, 24


def _hf_config(family):
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
  if family == "qwen3":  # GQA, head_dim != d_model / heads, tied embeddings
    return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True)
  if family == "qwen2":  # q/k/v biases (made nonzero below)
    return transformers.Qwen2Config(**common, tie_word_embeddings=True)
  # untied, Llama-3 rope scaling with positions beyond original_max_position_embeddings (16 < T)
  return transformers.LlamaConfig(
      **common, tie_word_embeddings=False,
      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16})


def _build(directory, family, seed=0):
  """A random-init HF model whose every parameter (norms, biases too) is far from its default."""
  torch.manual_seed(seed)
  hf_model = transformers.AutoModelForCausalLM.from_config(_hf_config(family),
                                                           attn_implementation="eager")
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  hf_model.eval()
  hf_model.save_pretrained(directory)
  return hf_model


def _batch(seed=0):
  """Left-padded batch: row b has pads[b] padding tokens first."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(3, T)).astype(np.int32)
  pads = [0, 5, 11]
  mask = np.ones((3, T), bool)
  for b, n in enumerate(pads):
    mask[b, :n] = False
    tokens[b, :n] = 0
  return tokens, mask


def _hf_logits(hf_model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long),
                   position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.numpy()


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def built(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param))
  return request.param, directory, _build(directory, request.param)


def test_logit_parity_left_padded(built):
  family, directory, hf_model = built
  cfg, params = hf.load(directory)
  assert cfg.family == family
  tokens, mask = _batch()
  ours = np.asarray(model.forward(cfg, params, tokens, mask_BT=mask))
  ref = _hf_logits(hf_model, tokens, mask)
  assert ref[mask].std() > 0.3  # the logits are not trivially small
  np.testing.assert_array_less(np.abs(ours - ref)[mask].max(), 1e-4)
  if family == "llama":  # the scaling really is exercised: without it the logits differ
    unscaled = np.asarray(model.forward(cfg.replace(rope_scaling=None), params, tokens,
                                        mask_BT=mask))
    assert np.abs(unscaled - ref)[mask].max() > 1e-2


def test_config_mapping(built):
  family, directory, _ = built
  with open(os.path.join(directory, "config.json")) as f:
    cfg = hf.config_from_hf(json.load(f))
  assert cfg.head_dim == (24 if family == "qwen3" else 16)
  assert cfg.qk_norm == (family == "qwen3") and cfg.qkv_bias == (family == "qwen2")
  assert cfg.tie_embeddings == (family != "llama")
  assert cfg.norm_eps == 1e-5 and cfg.n_kv_heads == 2
  if family == "llama":
    assert cfg.rope_scaling_dict == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}
  # Legacy spelling (rope_theta / rope_scaling at top level, as in Llama-3.1's config.json).
  legacy = hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                              "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 8, "rope_theta": 500000.0,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192}})
  assert legacy.rope_theta == 500000.0 and legacy.rope_scaling_dict["factor"] == 8.0
  assert legacy.n_kv_heads == 2 and legacy.head_dim == 4


def test_save_then_transformers_loads_same_logits(built, tmp_path):
  family, directory, hf_model = built
  cfg, params = hf.load(directory)
  # Small shards force the sharded index format on the way out (and on the way back in).
  hf.save(str(tmp_path), cfg, params, max_shard_bytes=100_000)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               attn_implementation="eager")
  reloaded.eval()
  tokens, mask = _batch(seed=1)
  ref = _hf_logits(hf_model, tokens, mask)
  np.testing.assert_array_less(np.abs(_hf_logits(reloaded, tokens, mask) - ref)[mask].max(),
                               1e-5)
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_load_bfloat16(built):
  _, directory, hf_model = built
  cfg, params = hf.load(directory, dtype="bfloat16")
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
  tokens, mask = _batch()
  ours = np.asarray(model.forward(cfg, params, tokens, mask_BT=mask))
  ref = _hf_logits(hf_model, tokens, mask)
  assert np.abs(ours - ref)[mask].mean() < 0.1 * np.abs(ref[mask]).mean()


def test_load_onto_mesh_shards_parameters(tmp_path):
  hf_model = _build(str(tmp_path), "qwen3")
  mesh = parallel.make_mesh(2, 2, 2)
  cfg, params = hf.load(str(tmp_path), mesh=mesh)
  shard = lambda x: x.addressable_shards[0].data.shape
  layers = params["layers"]
  # embed -> fsdp, heads/kv_heads/mlp/vocab -> tensor (parallel.LOGICAL_RULES)
  assert shard(layers["attn"]["q_proj"]["kernel"]) == (2, 32, 2, 24)
  assert shard(layers["attn"]["k_proj"]["kernel"]) == (2, 32, 1, 24)
  assert shard(layers["attn"]["o_proj"]["kernel"]) == (2, 2, 24, 32)
  assert shard(layers["mlp"]["down"]["kernel"]) == (2, 48, 32)
  assert shard(params["embed"]["embedding"]) == (64, 32)
  assert shard(layers["attn"]["q_norm"]["scale"]) == (2, 24)
  assert len(params["embed"]["embedding"].sharding.device_set) == 8
  tokens, mask = _batch()
  ours = np.asarray(jax.jit(lambda p, t, m: model.forward(cfg, p, t, mask_BT=m))(
      params, tokens, mask))
  np.testing.assert_array_less(np.abs(ours - _hf_logits(hf_model, tokens, mask))[mask].max(),
                               1e-4)


# --------------------------------------------------------------------------------------------
# Bad inputs: each names the tensor or key
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("good"))
  _build(directory, "qwen2")
  return directory


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
  tensors = load_file(os.path.join(src, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  os.makedirs(dst, exist_ok=True)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return dst


def _drop(key):
  return lambda t: t.pop(key)


def _reshape(key):
  def edit(t):
    t[key] = t[key][:-1]
  return edit


def _add(key):
  def edit(t):
    t[key] = np.zeros(4, np.float32)
  return edit


BAD = [
    ("unsupported arch", None,
     lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral"),
     "MistralForCausalLM"),
    ("missing tensor", _drop("model.layers.1.mlp.up_proj.weight"), None,
     "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("wrong shape", _reshape("model.layers.0.self_attn.k_proj.weight"), None,
     "'model.layers.0.self_attn.k_proj.weight' has shape [31, 64]"),
    ("vocab mismatch", None, lambda c: c.update(vocab_size=VOCAB + 3),
     "vocab mismatch: tensor 'model.embed_tokens.weight'"),
    ("extra tensor", _add("model.layers.0.self_attn.o_proj.bias"), None,
     "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"),
    ("missing config key", None, lambda c: c.pop("num_hidden_layers"), "'num_hidden_layers'"),
    ("unsupported activation", None, lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    ("unsupported rope", None,
     lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "'yarn'"),
]


@pytest.mark.parametrize("name,edit_tensors,edit_config,message", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoint_is_named(good_dir, tmp_path, name, edit_tensors, edit_config, message):
  bad = _copy_with(good_dir, str(tmp_path / "bad"), edit_tensors, edit_config)
  with pytest.raises(hf.CheckpointFormatError, match=None) as info:
    hf.load(bad)
  assert message in str(info.value), str(info.value)


def test_missing_and_corrupt_files(good_dir, tmp_path):
  with pytest.raises(hf.CheckpointFormatError, match="no config.json"):
    hf.load(str(tmp_path))
  bad = _copy_with(good_dir, str(tmp_path / "bad"))
  os.remove(os.path.join(bad, "model.safetensors"))
  with pytest.raises(hf.CheckpointFormatError, match="no model.safetensors"):
    hf.load(bad)
  with open(os.path.join(bad, "model.safetensors"), "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(hf.CheckpointFormatError, match="not a readable safetensors file"):
    hf.load(bad)


def test_save_rejects_params_not_matching_config(good_dir, tmp_path):
  cfg, params = hf.load(good_dir)
  params["layers"]["mlp"]["up"]["kernel"] = params["layers"]["mlp"]["up"]["kernel"][:, :, :5]
  with pytest.raises(hf.CheckpointFormatError, match="layers/mlp/up/kernel"):
    hf.save(str(tmp_path), cfg, params)
  assert not os.listdir(tmp_path)  # nothing written


def test_tied_checkpoint_that_also_stores_lm_head_loads(good_dir, tmp_path):
  def add_copy(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  directory = _copy_with(good_dir, str(tmp_path / "tied"), edit_tensors=add_copy)
  cfg, params = hf.load(directory)
  assert cfg.tie_embeddings and "lm_head" not in params
