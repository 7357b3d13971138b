"""An experiment config checked before any compute: keys and types (config.check_keys), each
choice against the tuple of the module that implements it, and the combinations that cannot run
(a mesh this machine or the planned TPU slice cannot hold, settings the chosen data path would
ignore, ...). Raises config.ConfigError naming the first bad key, in one line.

It sits above the modules whose choices it checks (config.py, the schema, imports nothing of the
project), so no import runs back up.
"""
from __future__ import annotations

import os

import ml_collections

from opsd_jax import benchmarks, config, data, grid, losses, memory, parallel, prompts, rl
from opsd_jax import tokenizer
from opsd_jax.config import ConfigError
from opsd_jax.train import loop, optim, steps


# Each choice is checked against the tuple of the module that implements it, so a new divergence,
# filter, teacher or optimizer is one edit there.
CHOICES = {
    "tokenizer.kind": tokenizer.KINDS,
    "tokenizer.chat_template": tokenizer.TEMPLATES,
    "data.kind": data.KINDS,
    "data.family": data.TOY_FAMILIES,
    "data.format": data.FORMATS,
    "data.on_bad_row": data.ON_BAD_ROW,
    "eval.thinking": benchmarks.THINKING,
    "optimizer.name": optim.OPTIMIZERS,
    "optimizer.schedule": optim.SCHEDULES,
    "optimizer.state_dtype": optim.STATE_DTYPES,
    "rlvr.advantage_scale": rl.ADVANTAGE_SCALES,
    "rlvr.aggregation": losses.AGGREGATIONS,
    "rlvr.dynamic_sampling": rl.DYNAMIC_SAMPLING,
    "opsd.teacher": steps.TEACHERS,
    "opsd.teacher_context": prompts.CONTEXTS,
    "opsd.divergence": losses.DIVERGENCES,
    "opsd.estimator": losses.ESTIMATORS,
    "opsd.reduction": losses.REDUCTIONS,
    "opsd.rollout_filter": losses.ROLLOUT_FILTERS,
    "on_nonfinite": loop.ON_NONFINITE,
}

_POSITIVE = ("sft.batch_size", "sft.micro_batches", "sft.seq_len", "rlvr.prompts_per_step",
             "rlvr.group_size", "rlvr.mini_batches", "rlvr.updates_per_batch",
             "opsd.prompts_per_step", "opsd.rollouts_per_prompt", "opsd.mini_batches",
             "sampling.max_new_tokens", "eval.batch_size", "eval.max_new_tokens",
             "eval.samples_per_problem", "loss_chunk")
_NON_NEGATIVE = ("sft.steps", "rlvr.steps", "opsd.steps", "seed", "log_every",
                 "rlvr.max_refill_rounds")


def _get(cfg, dotted):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(cfg: ml_collections.ConfigDict, *, reference: ml_collections.ConfigDict | None = None,
             num_devices: int | None = None, check_devices: bool = True
             ) -> ml_collections.ConfigDict:
  """Checks keys, types and combinations; raises ConfigError naming the first bad key.

  The mesh is checked against `num_devices` (default: jax.device_count(); check_devices=False
  skips it, e.g. when validating on a machine other than the one that will run).
  """
  _check_choice_types(cfg)
  config.check_keys(cfg, reference)
  _check_choices(cfg)
  _check_grid(cfg)
  _check_numbers(cfg)
  _check_stages(cfg)
  _check_rlvr(cfg)
  _check_opsd(cfg)
  if cfg.plan.tpu:
    try:
      num_devices = memory.tpu_slice(cfg.plan.tpu).chips  # the plan's mesh is the slice's
    except ValueError as e:
      raise ConfigError(str(e)) from None
  lora_problems = config.lora_problems(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
  if lora_problems:
    raise ConfigError(lora_problems[0])
  _check_data_and_tokenizer(cfg)
  _check_mesh(cfg, num_devices, check_devices)
  _check_model(cfg)
  return cfg


# Choices that were bools once: an old config's True / False is told what it meant.
_WAS_BOOL = {"rlvr.dynamic_sampling": "it was a bool: True meant 'mask', False 'off'"}


def _choice_error(key, value) -> ConfigError:
  hint = f" ({_WAS_BOOL[key]})" if key in _WAS_BOOL and str(value) in ("True", "False") else ""
  return ConfigError(f"{key} must be one of {CHOICES[key]}, got {value!r}{hint}")


def _check_choice_types(cfg):
  """Before check_keys' type check: a choice that is not a string (True left in an old config)
  is named with its choices, not only with its type."""
  for key in CHOICES:
    try:
      value = _get(cfg, key)
    except (KeyError, AttributeError, TypeError):
      continue  # a missing key or section: check_keys names it
    if not isinstance(value, str):
      raise _choice_error(key, value)


def _check_choices(cfg):
  for key, choices in CHOICES.items():
    value = _get(cfg, key)
    if value not in choices:
      raise _choice_error(key, value)


def _check_grid(cfg):
  """Filters are opsd's, divergences name grid.ARMS (the opsd settings of each arm), the extra
  arms are 'rollout_filter/arm'; the grid's three lists are all set or all empty."""
  g = cfg.grid
  filters, arms = CHOICES["opsd.rollout_filter"], tuple(grid.ARMS)
  for value in g.rollout_filters:
    if value not in filters:
      raise ConfigError(f"grid.rollout_filters: {value!r} is not one of {filters}")
  for value in g.divergences:
    if value not in arms:
      raise ConfigError(f"grid.divergences: {value!r} is not one of the arms {arms}")
  for key in ("thinking_off_arms", "long_horizon_arms"):
    for entry in g[key]:
      rollout_filter, divergence = grid.parse_arm(entry)
      if rollout_filter not in filters or divergence not in arms:
        raise ConfigError(f"grid.{key}: {entry!r} is not 'rollout_filter/arm' with a filter in "
                          f"{filters} and an arm in {arms}")
    if g[key] and not g.seeds:
      raise ConfigError(f"grid.{key} needs grid.seeds")
  if bool(g.rollout_filters) != bool(g.divergences) or bool(g.rollout_filters) != bool(g.seeds):
    raise ConfigError("grid.rollout_filters, grid.divergences and grid.seeds must be all set "
                      "or all empty")
  if g.tau <= 0:
    raise ConfigError(f"grid.tau (fkl_tau's pointwise clip) must be > 0, got {g.tau}")
  if g.long_horizon_arms and g.long_horizon_factor < 2:
    raise ConfigError(f"grid.long_horizon_factor must be >= 2 (a 1x arm is a grid arm), got "
                      f"{g.long_horizon_factor}")


def _check_numbers(cfg):
  """Counts that must be positive, shares in [0, 1], sampling settings in range."""
  for key in _POSITIVE:
    if _get(cfg, key) < 1:
      raise ConfigError(f"{key} must be >= 1, got {_get(cfg, key)!r}")
  for key in _NON_NEGATIVE:
    if _get(cfg, key) < 0:
      raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)!r}")
  if not 0.0 <= cfg.sft.concise_share <= 1.0 or not 0.0 <= cfg.sft.thinking_off_share <= 1.0:
    raise ConfigError(f"sft.concise_share and sft.thinking_off_share must be in [0, 1], got "
                      f"{cfg.sft.concise_share} and {cfg.sft.thinking_off_share}")
  s = cfg.sampling
  if not 0.0 < s.top_p <= 1.0:
    raise ConfigError(f"sampling.top_p must be in (0, 1], got {s.top_p}")
  if s.temperature < 0:
    raise ConfigError(f"sampling.temperature must be >= 0, got {s.temperature}")
  if s.top_k < 0:
    raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {s.top_k}")
  if cfg.sft.batch_size % cfg.sft.micro_batches:
    raise ConfigError(f"sft.micro_batches ({cfg.sft.micro_batches}) must divide sft.batch_size "
                      f"({cfg.sft.batch_size})")


def _check_stages(cfg):
  for stage in cfg.stages:
    if stage not in config.STAGES:
      raise ConfigError(f"stages: unknown stage {stage!r} (known: {', '.join(config.STAGES)})")
  if "eval" in cfg.stages and tuple(cfg.stages) != ("eval",):
    raise ConfigError(f"stages: 'eval' evaluates init_from alone, so it is the only stage; got "
                      f"{tuple(cfg.stages)} (every training stage is evaluated anyway)")


def _check_rlvr(cfg):
  r = cfg.rlvr
  if "rlvr" in cfg.stages and r.group_size < 2:
    raise ConfigError(f"rlvr.group_size must be >= 2 for group advantages, got {r.group_size}")
  if (r.prompts_per_step * r.group_size) % r.mini_batches:
    raise ConfigError(f"rlvr.mini_batches ({r.mini_batches}) must divide prompts_per_step x "
                      f"group_size ({r.prompts_per_step * r.group_size})")
  if not (0 <= r.eps_low < 1 and r.eps_high >= 0):
    raise ConfigError(f"rlvr.eps_low must be in [0, 1) and rlvr.eps_high >= 0, got "
                      f"{r.eps_low}, {r.eps_high}")


def _check_opsd(cfg):
  o = cfg.opsd
  if not 0.0 <= o.jsd_beta <= 1.0:
    raise ConfigError(f"opsd.jsd_beta must be in [0, 1], got {o.jsd_beta}")
  if not 0.0 <= o.ema_decay < 1.0:
    raise ConfigError(f"opsd.ema_decay must be in [0, 1), got {o.ema_decay}")
  if o.loss_temperature <= 0:
    raise ConfigError(f"opsd.loss_temperature must be > 0, got {o.loss_temperature}")
  if o.estimator == "topk" and o.topk < 1:
    raise ConfigError(f"opsd.topk must be >= 1 with estimator topk, got {o.topk}")
  if o.estimator != "full" and o.clip >= 0:
    raise ConfigError("opsd.clip (pointwise clip) needs opsd.estimator='full'")
  if (o.prompts_per_step * o.rollouts_per_prompt) % o.mini_batches:
    raise ConfigError(f"opsd.mini_batches ({o.mini_batches}) must divide prompts_per_step x "
                      f"rollouts_per_prompt")
  if cfg.optimizer.master_weights and cfg.optimizer.state_dtype != "float32":
    raise ConfigError("optimizer.master_weights needs optimizer.state_dtype='float32'")


def _check_mesh(cfg, num_devices, check_devices):
  for axis in ("data", "fsdp", "tensor"):
    size = cfg.mesh[axis]
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis} must be a positive size or -1, got {size}")
  if num_devices is not None or check_devices:
    try:
      parallel.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
    except ValueError as e:
      raise ConfigError(str(e)) from None


def _check_model(cfg):
  """init_from is a Hugging Face directory, or the model section builds a ModelConfig."""
  if (cfg.init_from and "://" not in cfg.init_from
      and not os.path.isfile(os.path.join(cfg.init_from, "config.json"))):
    raise ConfigError(f"init_from: {cfg.init_from!r} is not a Hugging Face directory "
                      "(no config.json there)")
  if not cfg.init_from:
    section = cfg.model.to_dict()
    if section.get("vocab_size") == 0:  # 0 = the tokenizer's vocabulary, known at run time
      section["vocab_size"] = 1
    config.to_model_config(section)  # raises ConfigError naming the model key


def _check_data_and_tokenizer(cfg):
  """Settings the chosen data path would ignore are errors, not silent no-ops."""
  d, t = cfg.data, cfg.tokenizer
  if d.kind == "toy":
    ignored = [f"{k}={v!r}" for k, v in (("tokenizer.kind", t.kind), ("tokenizer.path", t.path),
                                         ("data.train_path", d.train_path),
                                         ("data.test_path", d.test_path))
               if v and v != "toy"] + (["eval.sets"] if cfg.eval.sets else [])
    if ignored:
      raise ConfigError(f"data.kind='toy' generates its own problems and tokenizer, so "
                        f"{', '.join(ignored)} would be ignored (set data.kind='jsonl' to use "
                        "files)")
    return
  training = [s for s in cfg.stages if s != "eval"] + (["grid"] if cfg.grid.rollout_filters else [])
  if training and not d.train_path:
    raise ConfigError(f"data.train_path must be set for {', '.join(training)}")
  if not d.test_path and not cfg.eval.sets:
    raise ConfigError("data.test_path or eval.sets must name an evaluation set")
  if t.kind == "toy":
    raise ConfigError("tokenizer.kind='toy' is trained on the toy task's text; with "
                      f"data.kind={d.kind!r} set tokenizer.kind to 'sentencepiece' or 'hf'")
  if not t.path and not (t.kind == "hf" and cfg.init_from):
    raise ConfigError(f"tokenizer.path must be set when tokenizer.kind={t.kind!r} (with "
                      "tokenizer.kind='hf' and init_from set, the checkpoint's own files are used)")
