"""Configuration: the model's architecture (a frozen dataclass, hashable so jit can take it as a
static argument) and the experiment schema (ml_collections) with validation before any compute.

An experiment file's `get_config()` returns a ConfigDict built from `default_config()` with its
own overrides; `validate(cfg)` then rejects an unknown key, a wrong type or an impossible
combination with one line that names the key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
STAGES = ("sft", "rlvr", "opsd", "eval")  # "eval" alone: evaluate init_from, train nothing
# Projections LoRA can adapt (the model's module names): attention q/k/v/o, MLP gate/up/down.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")


class ConfigError(ValueError):
  """A bad configuration value; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one decoder-only transformer (Llama / Qwen2 / Qwen3 by flags).

  `rope_scaling` is a tuple of (key, value) pairs so the config stays hashable; use
  `rope_scaling_dict` to read it.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  family: str = "qwen3"
  rope_theta: float = 1_000_000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  norm_eps: float = 1e-6
  qk_norm: bool = True       # Qwen3: RMSNorm over head_dim on q and k
  qkv_bias: bool = False     # Qwen2: biases on q, k and v
  tie_embeddings: bool = True
  dtype: str = "float32"        # activations / matmul inputs
  param_dtype: str = "float32"  # stored parameters
  remat: str = "none"           # rematerialisation per layer: none | full | dots
  max_position: int = 32768
  # LoRA (set from the experiment's `lora` section, see opsd_jax/lora.py): rank 0 = no adapters.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"model.{name} must be a positive int, got {value!r}")
    if not problems and self.n_heads % self.n_kv_heads:
      problems.append(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                      f"({self.n_kv_heads})")
    if not problems and self.head_dim % 2:
      problems.append(f"model.head_dim must be even for RoPE, got {self.head_dim}")
    if self.family not in FAMILIES:
      problems.append(f"model.family must be one of {FAMILIES}, got {self.family!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        problems.append(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.rope_scaling is not None:
      kind = dict(self.rope_scaling).get("rope_type")
      if kind not in ("llama3", "linear"):
        problems.append(f"model.rope_scaling.rope_type {kind!r} is not supported "
                        "(supported: llama3, linear)")
    problems += lora_problems(self.lora_rank, self.lora_alpha, self.lora_targets)
    if problems:
      raise ConfigError(problems[0])

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = self.rope_scaling_dict
    return d

  @classmethod
  def from_dict(cls, d) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"model.{unknown[0]} is not a model config key (known: {sorted(known)})")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = tuple(sorted(dict(d["rope_scaling"]).items()))
    if isinstance(d.get("lora_targets"), list):  # hashable, like rope_scaling
      d["lora_targets"] = tuple(d["lora_targets"])
    return cls(**d)

  def num_params(self) -> int:
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
    if self.qk_norm:
      attn += 2 * self.head_dim
    mlp = 3 * self.d_model * self.mlp_dim
    per_layer = attn + mlp + 2 * self.d_model
    embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return self.n_layers * per_layer + embed + self.d_model


def lora_problems(rank, alpha, targets) -> list[str]:
  """What is wrong with LoRA settings, named by their experiment keys (lora.*)."""
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    return [f"lora.rank must be an int >= 0 (0 = off), got {rank!r}"]
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    return [f"lora.alpha must be > 0, got {alpha!r}"]
  if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
    return [f"lora.targets must be a tuple of projection names, got {targets!r}"]
  for t in targets:
    if t not in LORA_TARGETS:
      return [f"lora.targets: {t!r} is not one of {LORA_TARGETS}"]
  if len(set(targets)) != len(targets):
    return [f"lora.targets names a projection twice: {tuple(targets)}"]
  if rank > 0 and not targets:
    return ["lora.targets must name at least one projection when lora.rank > 0"]
  return []


def model_config(**kw) -> ml_collections.ConfigDict:
  """The model section of an experiment config: the fields of ModelConfig (vocab_size 0 means
  the tokenizer's vocabulary size, filled in at run time). The lora_* fields are not in it: the
  experiment's `lora` section sets them (lora.with_config)."""
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.default is not dataclasses.MISSING and not f.name.startswith("lora_")}
  defaults.update(vocab_size=0, d_model=0, n_layers=0, n_heads=0, n_kv_heads=0, head_dim=0,
                  mlp_dim=0)
  defaults.update(kw)
  cfg = ml_collections.ConfigDict(defaults)
  return cfg


def to_model_config(section) -> ModelConfig:
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  return ModelConfig.from_dict(d)


# --------------------------------------------------------------------------------------------
# Experiment schema
# --------------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with its default. Experiment files start from this."""
  c = ml_collections.ConfigDict()
  c.name = "experiment"
  c.seed = 0
  c.stages = ("sft", "rlvr", "opsd")  # run in this order; each starts from the previous one
  c.init_from = ""                    # "" = random init; else a Hugging Face directory
  c.model = model_config()

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices

  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="toy",   # toy (sentencepiece trained on the toy corpus) | sentencepiece | hf
      path="",      # .model file or directory with tokenizer.json (+ tokenizer_config.json)
      vocab_size=0,
      chat_template="plain",  # plain | checkpoint
  ))

  c.data = ml_collections.ConfigDict(dict(
      kind="toy",          # toy | jsonl (any file opsd_jax.data.load reads: .jsonl/.json/.parquet)
      train_path="",
      test_path="",        # shorthand for one evaluation set (eval.sets names several)
      format="auto",       # auto | gsm8k | math
      on_bad_row="error",  # error | skip (skipped rows are counted)
      num_train=20000,
      num_test=500,
      difficulty=1,        # toy arithmetic family only (data/toy.py DIFFICULTIES)
      family="arithmetic",  # toy: arithmetic (data/toy.py) | strategy (data/toy_strategy.py)
  ))
  # Which key of a row holds the problem, the reference solution and the answer, for a layout
  # the loader does not know ("" = detect the layout from the row's keys).
  c.data.fields = ml_collections.ConfigDict(dict(problem="", solution="", answer=""))

  c.sampling = ml_collections.ConfigDict(dict(
      temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256, prompt_buckets=(64, 128, 256),
      continuous_batching=False, num_slots=0))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, warmup_steps=0, schedule="constant",  # constant|cosine
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
      state_dtype="param",    # param | float32: optimizer state (moments) dtype (train/optim.py)
      master_weights=False))  # keep a float32 copy of the params (needs state_dtype float32)

  c.sft = ml_collections.ConfigDict(dict(
      steps=0, batch_size=32, micro_batches=1, seq_len=256, packing=False,
      concise_share=0.3,   # toy: share of SFT examples with the teacher prompt, concise response
      thinking_off_share=0.0,  # toy: share of SFT examples with thinking off (short trace)
      learning_rate=-1.0,  # each stage's learning_rate < 0: use optimizer.learning_rate
      warmup_steps=-1,     # each stage's warmup_steps < 0: use optimizer.warmup_steps
      eval_every=0, checkpoint_every=0))

  c.rlvr = ml_collections.ConfigDict(dict(
      steps=0, prompts_per_step=16, group_size=8, mini_batches=1, updates_per_batch=1,
      advantage_scale="group",        # group | batch | none
      aggregation="token_mean",       # token_mean | seq_mean_token_mean | constant
      eps_low=0.2, eps_high=0.2, kl_beta=0.0,
      # off | mask | refill (DAPO): groups whose rewards are all equal (no gradient) are
      # trained, masked, or dropped and replaced by groups of further prompts, sampled in at most
      # max_refill_rounds extra rounds (DAPO's max_num_gen_batches; rl.DYNAMIC_SAMPLING)
      dynamic_sampling="refill", max_refill_rounds=4,
      mask_truncated=False,
      format_reward=0.0, overlong_penalty=0.0, overlong_buffer=0,
      learning_rate=-1.0, warmup_steps=-1, eval_every=0, checkpoint_every=0))

  c.opsd = ml_collections.ConfigDict(dict(
      steps=0, prompts_per_step=16, rollouts_per_prompt=1, mini_batches=1,
      teacher="frozen",              # frozen | ema | current
      ema_decay=0.99,
      teacher_context="full",        # full | answer_only | none
      divergence="rkl",              # fkl | rkl | jsd
      jsd_beta=0.5,
      estimator="full",              # full | topk | sampled
      topk=64,
      clip=-1.0,                     # pointwise clip tau; <0: off
      loss_temperature=1.0,
      reduction="token",             # token | sequence
      rollout_filter="correct_only",  # all | correct_only | incorrect_only | split_direction
      student_thinking=True, teacher_thinking=True,
      # A thinking-on teacher scoring a thinking-off student's answer sees this thought, closed
      # (`<think>` thought `</think>`), so both score the answer after a closed thought.
      teacher_thought="I have read the reference solution and understood it. Now I write the "
                      "solution in my own words.",
      learning_rate=-1.0, warmup_steps=-1, eval_every=0, checkpoint_every=0))

  # LoRA for every stage (opsd_jax/lora.py): rank 0 = full fine-tuning. Only the adapters
  # train; each stage ends by merging them into its output parameters.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=LORA_TARGETS))

  c.loss_chunk = 256  # tokens per chunk in chunked log-prob / divergence computation

  c.eval = ml_collections.ConfigDict(dict(
      num_problems=500, samples_per_problem=1, temperature=0.0, top_p=1.0, top_k=0,
      max_new_tokens=256, batch_size=128, verify_timeout_s=5.0,
      thinking="student",       # student (the mode the stage trained) | on | off
      answer_after_think=True,  # grade only the text after </think> (reward and evaluation)
  ))
  # Named benchmarks: eval.sets.<name> = dict(path=..., num_problems=-1, samples_per_problem=-1)
  # (-1: eval.num_problems / eval.samples_per_problem). Empty: data.test_path is the one set.
  c.eval.sets = ml_collections.ConfigDict()

  # Each stage's final parameters also as a Hugging Face directory (<workdir>/<stage>/hf).
  c.export = ml_collections.ConfigDict(dict(hf=False))

  # Local copies of remote (gs://, ...) init_from / tokenizer / data paths; "" = ~/.cache/opsd_jax.
  c.cache_dir = ""

  # The paper's grid (experiments/toy_paper_grid.py, opsd_jax/grid.py): after the stages, one
  # OPSD branch per (rollout filter, divergence arm, seed), each from the last stage's
  # parameters. Empty = no grid. divergences name arms (grid.ARMS: rkl | fkl | fkl_tau |
  # rkl_sampled); fkl_tau clips each pointwise summand at tau.
  # thinking_off_arms: extra "rollout_filter/arm" arms (same seeds) with a thinking-off student
  # and a thinking-on teacher (Paper A), evaluated with thinking off.
  # long_horizon_arms: "rollout_filter/arm" arms run for opsd.steps x long_horizon_factor steps
  # on long_horizon_seeds (empty: grid.seeds).
  c.grid = ml_collections.ConfigDict(dict(rollout_filters=(), divergences=(), seeds=(),
                                          thinking_off_arms=(), tau=0.05,
                                          long_horizon_arms=(), long_horizon_factor=5,
                                          long_horizon_seeds=()))

  # --dry_run's memory plan (opsd_jax/memory.py): a TPU slice such as "v5p-8" or "v5e-16" (its
  # chips are the plan's devices, fsdp=-1 takes all of them); "" = this machine's devices.
  c.plan = ml_collections.ConfigDict(dict(tpu=""))

  c.on_nonfinite = "stop"  # stop | skip
  c.log_every = 10
  return c


EVAL_SET_KEYS = dict(path="", num_problems=-1, samples_per_problem=-1)


def _check_eval_sets(sets):
  """eval.sets holds names the user chooses; each entry is a section of EVAL_SET_KEYS."""
  for name in sets.keys():
    entry = sets[name]
    if not isinstance(entry, (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"eval.sets.{name} must be a section with a path, got {entry!r}")
    _check_keys(ml_collections.ConfigDict(dict(entry)), ml_collections.ConfigDict(EVAL_SET_KEYS),
                f"eval.sets.{name}.")
    if not entry.get("path"):
      raise ConfigError(f"eval.sets.{name}.path must be set")
    for key in ("num_problems", "samples_per_problem"):
      value = entry.get(key, -1)
      if value != -1 and value < 1:
        raise ConfigError(f"eval.sets.{name}.{key} must be >= 1 (or -1: eval.{key}), got {value}")


def check_keys(cfg: ml_collections.ConfigDict,
               reference: ml_collections.ConfigDict | None = None) -> None:
  """Every key is one `reference` (default_config) has, with a value of its type; eval.sets
  entries against EVAL_SET_KEYS. Choices and combinations: experiment.validate."""
  _check_keys(cfg, default_config() if reference is None else reference, "")


def _check_keys(cfg, reference, prefix):
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if path == "eval.sets":
      _check_eval_sets(cfg[key])
      continue
    if key not in reference:
      raise ConfigError(f"{path} is not a config key (known under {prefix or 'top level'}: "
                        f"{sorted(reference.keys())})")
    value, ref = cfg[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{path} must be a section, got {type(value).__name__}")
      _check_keys(value, ref, f"{path}.")
    elif ref is not None and not _same_kind(value, ref):
      raise ConfigError(f"{path} must be {type(ref).__name__}, got {type(value).__name__} "
                        f"{value!r}")


def _same_kind(value, ref) -> bool:
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(ref, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))
