"""experiment.validate: a table of bad experiment configs, each rejected with one line naming the key;
ModelConfig's own checks."""
import json
import os

import ml_collections
import pytest

from opsd_jax import config as config_lib
from opsd_jax import experiment
from opsd_jax.config import ConfigError, ModelConfig


def _base():
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=0, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      mlp_dim=128))
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return c


def _with(edit):
  d = _base().to_dict()
  edit(d)
  return ml_collections.ConfigDict(d)


def _set(dotted, value):
  def edit(d):
    *parents, last = dotted.split(".")
    for p in parents:
      d = d[p]
    d[last] = value
  return edit


def _many(*edits):
  def edit(d):
    for e in edits:
      e(d)
  return edit


# (id, edit, text the error must contain: the key)
BAD = [
    ("unknown top key", _set("learning_rate", 1e-3), "learning_rate is not a config key"),
    ("unknown nested key", _set("rlvr.group_sz", 4), "rlvr.group_sz is not a config key"),
    ("wrong type str for int", _set("sft.batch_size", "32"), "sft.batch_size must be int"),
    ("wrong type int for bool", _set("rlvr.mask_truncated", 1), "rlvr.mask_truncated"),
    ("bad choice dynamic sampling", _set("rlvr.dynamic_sampling", "drop"),
     "rlvr.dynamic_sampling must be one of ('off', 'mask', 'refill')"),
    ("dynamic sampling left a bool", _set("rlvr.dynamic_sampling", True),
     "rlvr.dynamic_sampling must be one of ('off', 'mask', 'refill'), got True (it was a bool"),
    ("negative refill rounds", _set("rlvr.max_refill_rounds", -1), "rlvr.max_refill_rounds"),
    ("wrong type float for int", _set("rlvr.group_size", 8.0), "rlvr.group_size must be int"),
    ("section replaced by value", _set("optimizer", 3), "optimizer must be a section"),
    ("bad choice divergence", _set("opsd.divergence", "kl"), "opsd.divergence"),
    ("bad choice aggregation", _set("rlvr.aggregation", "mean"), "rlvr.aggregation"),
    ("bad choice optimizer", _set("optimizer.name", "lion"), "optimizer.name"),
    ("bad choice rollout filter", _set("opsd.rollout_filter", "good"), "opsd.rollout_filter"),
    ("unknown stage", _set("stages", ("sft", "ppo")), "stages"),
    ("micro-batches not dividing batch", _set("sft.micro_batches", 3), "sft.micro_batches"),
    ("group size 1", _set("rlvr.group_size", 1), "rlvr.group_size"),
    ("rlvr mini-batches not dividing prompts x group", _set("rlvr.mini_batches", 3),
     "rlvr.mini_batches"),
    ("opsd mini-batches not dividing", _set("opsd.mini_batches", 5), "opsd.mini_batches"),
    ("zero batch size", _set("sft.batch_size", 0), "sft.batch_size"),
    ("negative steps", _set("opsd.steps", -1), "opsd.steps"),
    ("top_p zero", _set("sampling.top_p", 0.0), "sampling.top_p"),
    ("negative temperature", _set("sampling.temperature", -0.5), "sampling.temperature"),
    ("jsd beta > 1", _set("opsd.jsd_beta", 1.5), "opsd.jsd_beta"),
    ("ema decay 1", _set("opsd.ema_decay", 1.0), "opsd.ema_decay"),
    ("loss temperature 0", _set("opsd.loss_temperature", 0.0), "opsd.loss_temperature"),
    ("eps_low >= 1", _set("rlvr.eps_low", 1.0), "rlvr.eps_low"),
    ("clip with topk", _many(_set("opsd.estimator", "topk"), _set("opsd.clip", 0.05)),
     "opsd.clip"),
    ("jsonl without path", _set("data.kind", "jsonl"), "data.train_path"),
    ("hf tokenizer without path", _many(_set("data.kind", "jsonl"),
                                        _set("data.train_path", "t.jsonl"),
                                        _set("data.test_path", "e.jsonl"),
                                        _set("tokenizer.kind", "hf")), "tokenizer.path"),
    ("jsonl without an evaluation set", _many(_set("data.kind", "jsonl"),
                                              _set("data.train_path", "t.jsonl")),
     "data.test_path"),
    ("toy data with an hf tokenizer it would ignore", _many(_set("tokenizer.kind", "hf"),
                                                            _set("tokenizer.path", "/nonexistent")),
     "tokenizer.kind='hf'"),
    ("toy data with a test file it would ignore", _set("data.test_path", "e.jsonl"),
     "data.test_path"),
    ("eval stage beside training stages", _set("stages", ("sft", "eval")), "'eval'"),
    ("eval set without a path", _set("eval.sets", {"math500": {"num_problems": 4}}),
     "eval.sets.math500.path"),
    ("eval set with an unknown key", _set("eval.sets", {"m": {"path": "x", "samples": 4}}),
     "eval.sets.m.samples"),
    ("eval thinking", _set("eval.thinking", "maybe"), "eval.thinking"),
    ("mesh axis zero", _set("mesh.fsdp", 0), "mesh.fsdp"),
    ("mesh larger than devices", _many(_set("mesh.data", 4), _set("mesh.fsdp", 2),
                                       _set("mesh.tensor", 2)), "mesh"),
    ("two -1 mesh axes", _many(_set("mesh.data", -1), _set("mesh.fsdp", -1)), "mesh"),
    ("missing init_from path", _set("init_from", "/nonexistent/qwen3"), "init_from"),
    ("heads not multiple of kv heads", _set("model.n_kv_heads", 3), "model.n_heads"),
    ("odd head_dim", _set("model.head_dim", 15), "model.head_dim"),
    ("unknown family", _set("model.family", "gpt2"), "model.family"),
    ("bad dtype", _set("model.dtype", "float16"), "model.dtype"),
    ("unknown model key", _set("model.n_experts", 8), "model.n_experts"),
]


@pytest.mark.parametrize("edit,key", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(edit, key):
  cfg = _with(edit)
  with pytest.raises(ConfigError) as info:
    experiment.validate(cfg)
  message = str(info.value)
  assert key in message, message
  assert "\n" not in message  # one line


def test_table_is_large_enough():
  assert len(BAD) >= 20


def test_good_configs_pass(tmp_path):
  experiment.validate(_base())
  experiment.validate(_with(_many(_set("mesh.data", 2), _set("mesh.fsdp", 2),
                                  _set("mesh.tensor", 2))))
  # A mesh for another machine: the device check can be skipped or pointed elsewhere.
  big = _with(_set("mesh.data", 64))
  experiment.validate(big, check_devices=False)
  experiment.validate(big, num_devices=64)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({}, f)
  experiment.validate(_with(_set("init_from", str(tmp_path))))


def test_bad_model_config_names_the_field():
  good = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
              mlp_dim=48)
  ModelConfig(**good)
  cases = [
      (dict(vocab_size=0), "model.vocab_size"),
      (dict(d_model=32.0), "model.d_model"),
      (dict(n_layers=True), "model.n_layers"),
      (dict(n_kv_heads=3), "model.n_heads"),
      (dict(head_dim=7), "model.head_dim"),
      (dict(family="mistral"), "model.family"),
      (dict(param_dtype="int8"), "model.param_dtype"),
      (dict(remat="some"), "model.remat"),
      (dict(rope_scaling=(("factor", 2.0), ("rope_type", "yarn"))), "model.rope_scaling"),
  ]
  for change, key in cases:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      ModelConfig(**{**good, **change})
  with pytest.raises(ConfigError, match="model.n_experts"):
    ModelConfig.from_dict({**good, "n_experts": 4})


def test_model_config_round_trips_and_counts_params():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    mlp_dim=48, qkv_bias=True, tie_embeddings=False,
                    rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))
  import jax
  import numpy as np
  from opsd_jax import model
  shapes = jax.tree.leaves(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))
  assert cfg.num_params() == sum(int(np.prod(s.shape)) for s in shapes)
