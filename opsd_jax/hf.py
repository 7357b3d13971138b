"""Hugging Face checkpoints: read and write Llama / Qwen2 / Qwen3 directories without torch.

`load` memory-maps the safetensors files (one file or a sharded index) and builds each parameter
with `jax.make_array_from_callback`: every device shard reads only its own slice, layer by layer,
so a large model is never held whole on the host, let alone twice. `save` writes config.json and
safetensors file(s) that `transformers.AutoModelForCausalLM.from_pretrained` loads; each file's
tensors are gathered to the host one file at a time. `export` adds the tokenizer and generation
config, so the directory is a complete checkpoint for transformers, vLLM and the Hub.

Layouts. HF linear weights are [out, in]; ours are [in, out] with heads split out:
  q/k/v_proj.weight [N*H, D] -> kernel [D, N, H];  bias [N*H] -> [N, H]
  o_proj.weight [D, N*H]     -> kernel [N, H, D]
  gate/up_proj.weight [F, D] -> kernel [D, F];  down_proj.weight [D, F] -> kernel [F, D]
  lm_head.weight [V, D]      -> kernel [D, V]
Per-layer HF tensors are stacked along a leading layer axis (the model scans over layers).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from opsd_jax import lora, model
from opsd_jax.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
_ARCH_OF_FAMILY = {v: k for k, v in ARCHITECTURES.items()}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class CheckpointFormatError(ValueError):
  """A Hugging Face directory we cannot read; the message names the file, key or tensor."""


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
  """ModelConfig from a config.json dict of LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM.

  Reads both the legacy (rope_theta + rope_scaling) and the transformers-5 (rope_parameters)
  spellings of RoPE settings.
  """
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    by_type = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
    if not archs and hf.get("model_type") in by_type:
      arch = by_type[hf["model_type"]]
    else:
      raise CheckpointFormatError(
          f"config.json: architectures={archs} (model_type={hf.get('model_type')!r}) is not "
          f"supported; supported: {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]

  def need(key):
    if key not in hf:
      raise CheckpointFormatError(f"config.json: missing key {key!r} (needed for {arch})")
    return hf[key]

  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointFormatError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported "
                                "(only silu)")
  if hf.get("mlp_bias"):
    raise CheckpointFormatError("config.json: mlp_bias=true is not supported")
  if hf.get("use_sliding_window"):
    raise CheckpointFormatError("config.json: use_sliding_window=true is not supported")
  if family != "qwen2" and hf.get("attention_bias"):
    raise CheckpointFormatError(f"config.json: attention_bias=true is not supported for {arch} "
                                "(it adds an o_proj bias)")

  n_heads = need("num_attention_heads")
  d_model = need("hidden_size")
  rope = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = {**legacy, **rope}
  scaling.pop("rope_theta", None)
  kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
  if kind == "default":
    rope_scaling = None
  elif kind == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
      raise CheckpointFormatError(f"config.json: llama3 rope scaling lacks {missing}")
    rope_scaling = (("rope_type", "llama3"),) + tuple((k, scaling[k]) for k in keys)
  elif kind == "linear":
    rope_scaling = (("factor", scaling["factor"]), ("rope_type", "linear"))
  else:
    raise CheckpointFormatError(f"config.json: rope type {kind!r} is not supported "
                                "(supported: default, llama3, linear)")
  if rope_scaling is not None:
    rope_scaling = tuple(sorted(rope_scaling))

  dtype = dtype or "float32"
  return ModelConfig(
      vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or d_model // n_heads, mlp_dim=need("intermediate_size"),
      family=family, rope_theta=float(rope_theta), rope_scaling=rope_scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qk_norm=family == "qwen3",
      qkv_bias=family == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      dtype=dtype, param_dtype=dtype,
      max_position=int(hf.get("max_position_embeddings", 32768)))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """config.json dict (transformers-5 spelling, plus the legacy rope keys older readers use)."""
  if cfg.family == "qwen3" and not cfg.qk_norm or cfg.family != "qwen3" and cfg.qk_norm:
    raise CheckpointFormatError(f"config: qk_norm={cfg.qk_norm} cannot be expressed as a "
                                f"{_ARCH_OF_FAMILY[cfg.family]} checkpoint")
  if cfg.family == "llama" and cfg.qkv_bias or cfg.family == "qwen2" and not cfg.qkv_bias:
    raise CheckpointFormatError(f"config: qkv_bias={cfg.qkv_bias} cannot be expressed as a "
                                f"{_ARCH_OF_FAMILY[cfg.family]} checkpoint")
  if cfg.family == "qwen3" and cfg.qkv_bias:
    raise CheckpointFormatError("config: qkv_bias=True with qwen3 would need an o_proj bias too")
  rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope_parameters.update(cfg.rope_scaling_dict)
  hf = {
      "architectures": [_ARCH_OF_FAMILY[cfg.family]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": cfg.rope_scaling_dict,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position,
      "attention_bias": False,
      "mlp_bias": False,
      "use_cache": True,
      "dtype": cfg.param_dtype,
      "torch_dtype": cfg.param_dtype,  # the name transformers < 4.56 (and vLLM on it) reads
  }
  if cfg.family == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  if cfg.family == "qwen3":
    hf.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
              max_window_layers=cfg.n_layers)
  return hf


# --------------------------------------------------------------------------------------------
# Tensor layout map
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one of our parameters is made from HF tensors.

  `groups[i]` splits HF dim i into sub-dims (e.g. N*H -> (N, H)); the split tensor is transposed
  by `perm` into our per-layer layout. `layered` params stack one HF tensor per layer.
  """
  path: tuple[str, ...]
  hf_name: str                       # with {i} for the layer index
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  layered: bool

  def hf_key(self, layer: int | None) -> str:
    return self.hf_name.format(i=layer)

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    mid = [d for g in self.groups for d in g]
    return tuple(mid[p] for p in self.perm)


def _specs(cfg: ModelConfig) -> list[_Spec]:
  D, N, K, H, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  lay = "model.layers.{i}."
  specs = [
      _Spec(("embed", "embedding"), "model.embed_tokens.weight", ((V,), (D,)), (0, 1), False),
      _Spec(("final_norm", "scale"), "model.norm.weight", ((D,),), (0,), False),
      _Spec(("layers", "attn_norm", "scale"), lay + "input_layernorm.weight", ((D,),), (0,), True),
      _Spec(("layers", "mlp_norm", "scale"), lay + "post_attention_layernorm.weight", ((D,),),
            (0,), True),
      _Spec(("layers", "attn", "o_proj", "kernel"), lay + "self_attn.o_proj.weight",
            ((D,), (N, H)), (1, 2, 0), True),
      _Spec(("layers", "mlp", "gate", "kernel"), lay + "mlp.gate_proj.weight", ((F,), (D,)),
            (1, 0), True),
      _Spec(("layers", "mlp", "up", "kernel"), lay + "mlp.up_proj.weight", ((F,), (D,)),
            (1, 0), True),
      _Spec(("layers", "mlp", "down", "kernel"), lay + "mlp.down_proj.weight", ((D,), (F,)),
            (1, 0), True),
  ]
  for name, heads in (("q", N), ("k", K), ("v", K)):
    specs.append(_Spec(("layers", "attn", f"{name}_proj", "kernel"),
                       lay + f"self_attn.{name}_proj.weight", ((heads, H), (D,)), (2, 0, 1), True))
    if cfg.qkv_bias:
      specs.append(_Spec(("layers", "attn", f"{name}_proj", "bias"),
                         lay + f"self_attn.{name}_proj.bias", ((heads, H),), (0, 1), True))
  if cfg.qk_norm:
    for name in ("q", "k"):
      specs.append(_Spec(("layers", "attn", f"{name}_norm", "scale"),
                         lay + f"self_attn.{name}_norm.weight", ((H,),), (0,), True))
  if not cfg.tie_embeddings:
    specs.append(_Spec(("lm_head", "kernel"), "lm_head.weight", ((V,), (D,)), (1, 0), False))
  return specs


def _read_slice(handle, key: str, spec: _Spec, index: tuple[slice, ...], dtype) -> np.ndarray:
  """Our-layout slice `index` (per layer) of HF tensor `key`, reading as little as possible.

  A split HF dim (N*H) is read as a contiguous row range when only its leading sub-dim is sliced
  (head_dim is never sharded); otherwise the whole dim is read and sliced afterwards.
  """
  mid_shape = [d for g in spec.groups for d in g]
  mid_index = [None] * len(mid_shape)
  for ours, mid in enumerate(spec.perm):
    mid_index[mid] = index[ours].indices(mid_shape[mid])[:2]
  hf_index, after, local_shape, m = [], [], [], 0
  for group in spec.groups:
    dims = list(range(m, m + len(group)))
    m += len(group)
    inner = math.prod(group[1:])
    if all(mid_index[d] == (0, mid_shape[d]) for d in dims[1:]):
      start, stop = mid_index[dims[0]]
      hf_index.append(slice(start * inner, stop * inner))
      local_shape += [stop - start, *group[1:]]
      after += [slice(None)] * len(group)
    else:
      hf_index.append(slice(None))
      local_shape += list(group)
      after += [slice(*mid_index[d]) for d in dims]
  array = handle.get_slice(key)[tuple(hf_index)]
  array = array.reshape(local_shape)[tuple(after)].transpose(spec.perm)
  return np.ascontiguousarray(array, dtype=dtype)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def _weight_files(path: str) -> dict[str, str]:
  """tensor name -> safetensors file holding it."""
  index_path = os.path.join(path, _INDEX_FILE)
  single = os.path.join(path, _SINGLE_FILE)
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointFormatError(f"{index_path}: not a safetensors index ({e})") from e
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  if os.path.exists(single):
    try:
      with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError on a bad header
      raise CheckpointFormatError(f"{single}: not a readable safetensors file ({e})") from e
  raise CheckpointFormatError(f"{path}: no {_SINGLE_FILE} or {_INDEX_FILE} found")


def read_config(path: str, dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory (reads config.json only)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointFormatError(f"{path}: no config.json")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f"{config_path}: not valid JSON ({e})") from e
  return config_from_hf(hf_config, None if dtype is None else jnp.dtype(dtype).name)


def load(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None
         ) -> tuple[ModelConfig, Any]:
  """Reads a Hugging Face directory into (ModelConfig, params).

  dtype: "float32" (default) or "bfloat16", for both parameters and activations. With a mesh,
  each parameter lands directly on `parallel.param_shardings(cfg, mesh)`; else on device 0.
  """
  cfg = read_config(path, dtype)
  files = _weight_files(path)
  specs = _specs(cfg)
  if cfg.tie_embeddings:
    files.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
  expected = {s.hf_key(i) for s in specs for i in (range(cfg.n_layers) if s.layered else [None])}
  extra = sorted(set(files) - expected)
  if extra:
    raise CheckpointFormatError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} extra) "
                                f"for {_ARCH_OF_FAMILY[cfg.family]} with this config.json")
  missing = sorted(expected - set(files), key=_natural)
  if missing:
    raise CheckpointFormatError(f"{path}: missing tensor {missing[0]!r} "
                                f"({len(missing)} missing)")

  if mesh is not None:
    from opsd_jax import parallel  # local: parallel imports model lazily too
    shardings = parallel.param_shardings(cfg, mesh)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.unbox(model.abstract_params(cfg)))
  np_dtype = np.dtype(ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else np.float32)

  handles: dict[str, Any] = {}
  try:
    def handle(key):
      file = files[key]
      if file not in handles:
        try:
          handles[file] = safe_open(file, framework="numpy")
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header
          raise CheckpointFormatError(f"{file}: not a readable safetensors file ({e})") from e
      return handles[file]

    params: dict[str, Any] = {}
    for spec in specs:
      for layer in range(cfg.n_layers) if spec.layered else [None]:
        key = spec.hf_key(layer)
        shape = tuple(handle(key).get_slice(key).get_shape())
        if shape != spec.hf_shape:
          noun = "vocab mismatch: " if key in ("model.embed_tokens.weight", "lm_head.weight") \
              and shape[1:] == spec.hf_shape[1:] else ""
          raise CheckpointFormatError(f"{path}: {noun}tensor {key!r} has shape {list(shape)}, "
                                      f"config.json implies {list(spec.hf_shape)}")
      full_shape = ((cfg.n_layers,) if spec.layered else ()) + spec.layer_shape
      sharding = _at(shardings, spec.path)

      def callback(index, spec=spec):
        if not spec.layered:
          return _read_slice(handle(spec.hf_key(None)), spec.hf_key(None), spec, index, np_dtype)
        layers = range(*index[0].indices(cfg.n_layers))
        return np.stack([_read_slice(handle(spec.hf_key(i)), spec.hf_key(i), spec, index[1:],
                                     np_dtype) for i in layers])

      array = jax.make_array_from_callback(full_shape, sharding, callback)
      _set(params, spec.path, array)
  finally:
    handles.clear()  # safe_open handles close (and unmap) when collected
  return cfg, params


def _natural(name):
  return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]


def _at(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def save(path: str, cfg: ModelConfig, params, max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json and model.safetensors (or shards + index when larger than
  max_shard_bytes) that transformers' from_pretrained loads. Files are written to temporary
  names and renamed, so an interrupted save leaves no half-written file behind.

  Params holding LoRA adapters (lora_a / lora_b next to kernels, cfg.lora_rank > 0) are saved
  merged: W + (alpha / r) A B, the plain model a Hugging Face reader expects."""
  if lora.has_adapters(params):
    params = lora.merge(cfg, params)
  cfg = cfg.replace(lora_rank=0) if cfg.lora_rank else cfg
  specs = _specs(cfg)
  _check_params(cfg, params, specs)
  os.makedirs(path, exist_ok=True)
  np_dtype = np.dtype(ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else np.float32)

  # Plan the files from the shapes, then gather each file's tensors only when writing it.
  entries = []  # (hf key, spec, layer, nbytes)
  for spec in specs:
    for layer in range(cfg.n_layers) if spec.layered else [None]:
      entries.append((spec.hf_key(layer), spec, layer,
                      math.prod(spec.hf_shape) * np_dtype.itemsize))
  shards, current, size = [], [], 0
  for entry in entries:
    if current and size + entry[3] > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += entry[3]
  shards.append(current)
  names = ([_SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

  weight_map = {}
  for name, shard in zip(names, shards):
    tensors = {}
    for key, spec, layer, _ in shard:
      leaf = _at(params, spec.path)
      ours = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
      inverse = np.argsort(spec.perm)
      hf_array = ours.transpose(inverse).reshape(spec.hf_shape)
      tensors[key] = np.ascontiguousarray(hf_array, dtype=np_dtype)
      weight_map[key] = name
    _atomic(os.path.join(path, name),
            lambda tmp, tensors=tensors: save_file(tensors, tmp, metadata={"format": "pt"}))
    del tensors
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map}
    _atomic(os.path.join(path, _INDEX_FILE), lambda tmp: _write_json(tmp, index))
  _atomic(os.path.join(path, "config.json"), lambda tmp: _write_json(tmp, config_to_hf(cfg)))


def _check_params(cfg, params, specs):
  for spec in specs:
    try:
      leaf = _at(params, spec.path)
    except (KeyError, TypeError):
      raise CheckpointFormatError(f"params: missing {'/'.join(spec.path)}") from None
    want = ((cfg.n_layers,) if spec.layered else ()) + spec.layer_shape
    if tuple(leaf.shape) != want:
      raise CheckpointFormatError(f"params: {'/'.join(spec.path)} has shape {tuple(leaf.shape)}, "
                                  f"the config implies {want}")


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _atomic(final_path, write):
  tmp = final_path + ".tmp"
  write(tmp)
  os.replace(tmp, final_path)


# --------------------------------------------------------------------------------------------
# export: a complete Hugging Face directory
# --------------------------------------------------------------------------------------------

# Copied when the tokenizer directory has them; tokenizer.json and tokenizer_config.json must be.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json",
                   "tokenizer.model")
_REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_GENERATION_FILE = "generation_config.json"


def export(path: str, cfg: ModelConfig, params, tokenizer_dir: str | None = None,
           generation_config: dict[str, Any] | str | None = None,
           max_shard_bytes: int = 4 << 30) -> str:
  """Writes a complete Hugging Face checkpoint directory at `path` and returns `path`.

  Weights and config.json as `save` writes them (LoRA merged, sharded with an index above
  max_shard_bytes); the tokenizer files of `tokenizer_dir` (the run's Hugging Face tokenizer
  directory) copied; generation_config.json; and config.json's bos/eos/pad ids set from the
  tokenizer so that transformers' generate stops where our sampler does.

  generation_config: a dict, or a directory (e.g. init_from) or file holding
  generation_config.json, written as is. None: tokenizer_dir's own generation_config.json, else
  one made from the tokenizer's eos/pad/bos ids.

  The directory is built in a temporary sibling and renamed into place, so readers never see a
  half-written export; an existing export at `path` is replaced.
  """
  from opsd_jax import tokenizer as tokenizer_lib  # local: tokenizer is not needed by load/save
  path = os.path.abspath(path)
  tok = None
  if tokenizer_dir is not None:
    if not os.path.isdir(tokenizer_dir):
      raise CheckpointFormatError(f"export: tokenizer_dir {tokenizer_dir!r} is not a directory "
                                  "(a Hugging Face tokenizer directory is needed)")
    for name in _REQUIRED_TOKENIZER_FILES:
      if not os.path.isfile(os.path.join(tokenizer_dir, name)):
        raise CheckpointFormatError(f"export: {tokenizer_dir}: no {name}")
    tok = tokenizer_lib.HFTokenizer(tokenizer_dir)
    if tok.vocab_size > cfg.vocab_size:
      raise CheckpointFormatError(
          f"export: {tokenizer_dir}/tokenizer.json has {tok.vocab_size} tokens, more than the "
          f"model's vocab_size {cfg.vocab_size}")
  generation = _generation_config(generation_config, tokenizer_dir, tok)
  if os.path.exists(path) and not os.path.isdir(path):
    raise CheckpointFormatError(f"export: {path} exists and is not a directory")

  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    save(tmp, cfg, params, max_shard_bytes)
    if tokenizer_dir is not None:
      for file in TOKENIZER_FILES:
        source = os.path.join(tokenizer_dir, file)
        if os.path.isfile(source):
          shutil.copyfile(source, os.path.join(tmp, file))  # follows links: the content ships
    if generation is not None:
      _write_json(os.path.join(tmp, _GENERATION_FILE), generation)
    config_path = os.path.join(tmp, "config.json")
    with open(config_path) as f:
      config = json.load(f)
    config.update(_token_ids(tok, generation))
    _write_json(config_path, config)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from other users
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _generation_config(given, tokenizer_dir, tok) -> dict[str, Any] | None:
  if isinstance(given, dict):
    return dict(given)
  if isinstance(given, str):
    file = os.path.join(given, _GENERATION_FILE) if os.path.isdir(given) else given
    if not os.path.isfile(file):
      raise CheckpointFormatError(f"export: generation_config {given!r}: no {_GENERATION_FILE}")
    return _read_generation_json(file)
  if given is not None:
    raise CheckpointFormatError(f"export: generation_config must be a dict or a path, got "
                                f"{type(given).__name__}")
  if tokenizer_dir is not None and os.path.isfile(os.path.join(tokenizer_dir, _GENERATION_FILE)):
    return _read_generation_json(os.path.join(tokenizer_dir, _GENERATION_FILE))
  if tok is None:
    return None
  eos = list(tok.eos_ids)
  made = {"eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": tok.pad_id}
  if tok.bos_id is not None:
    made["bos_token_id"] = tok.bos_id
  return made


def _read_generation_json(file):
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f"{file}: not valid JSON ({e})") from e


def _token_ids(tok, generation) -> dict[str, Any]:
  """config.json's bos/eos/pad ids: the tokenizer's, else the generation config's."""
  generation = generation or {}
  ids = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
         if generation.get(k) is not None}
  if tok is not None:
    ids["eos_token_id"] = tok.eos_ids[0]  # tokenizer_config's eos_token, as HF configs carry it
    ids["pad_token_id"] = tok.pad_id
    if tok.bos_id is not None:
      ids["bos_token_id"] = tok.bos_id
  return ids


def _replace_dir(tmp, path):
  """Renames the finished `tmp` to `path`, moving an earlier export aside first."""
  if not os.path.exists(path):
    os.rename(tmp, path)
    return
  parent, name = os.path.split(path)
  old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
  os.rename(path, os.path.join(old, name))
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)
