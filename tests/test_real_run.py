"""The path a researcher takes, with real files: a Qwen3 checkpoint in the Hub's on-disk form
(bf16 safetensors shards + index, the real vocabulary of 151,936), Qwen3's real tokenizer and
chat template, real GSM8K and MATH500 rows, and the paper presets.

- the presets' --dry_run on the real config.json files plans what the run then builds (model
  config, parameter dtypes, LoRA) and shows the rows that cannot fit;
- one scaled-down run through the CLI: RLVR (2 steps) -> OPSD (2 steps, thinking-off student,
  thinking-on teacher) -> evaluation on two benchmarks -> Hugging Face export, which transformers
  loads with the same logits.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import pipeline_helpers as helpers
import real_files
from opsd_jax import config as config_lib
from opsd_jax import experiment
from opsd_jax import hf, lora, model, pipeline

REPO = helpers.REPO
PAPER_A = os.path.join(REPO, "experiments", "paper_a_qwen3_1p7b.py")
PAPER_B = os.path.join(REPO, "experiments", "paper_b_qwen3_8b.py")
PRESETS = {"paper_a_qwen3_1p7b": (PAPER_A, "1p7b"), "paper_b_qwen3_8b": (PAPER_B, "8b")}


def _sets(path_of):
  return [f"--config.eval.sets.{name}.path={path_of(name)}" for name in ("math500", "aime24",
                                                                          "aime25")]


def _real_sets(name):  # AIME25 is not vendored: the AIME24 file stands in for its path
  return real_files.data_file("math500_test.jsonl" if name == "math500" else "aime24_test.jsonl")


def _checkpoint_dir(directory, config_json):
  """A checkpoint folder as a dry run needs it: config.json and the tokenizer files, no
  weights."""
  real_files.qwen3_tokenizer_dir(str(directory))
  shutil.copy(config_json, os.path.join(directory, "config.json"))
  return str(directory)


def _preset(path, **overrides):
  sys.path.insert(0, REPO)
  try:
    import importlib.util
    spec = importlib.util.spec_from_file_location("preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
  finally:
    sys.path.remove(REPO)
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tpu", ["v5p-8", "v5e-16"])
def test_preset_dry_run_on_the_real_configs(name, tpu, tmp_path):
  """The plan --dry_run prints (pipeline.plan; the CLI path is test_the_run_builds_...)."""
  path, size = PRESETS[name]
  ckpt = _checkpoint_dir(tmp_path / "ckpt", real_files.CONFIGS[size])
  # AIME24 as training data: its longest teacher prompts (solution included) are over the
  # presets' 2,048-token bucket, so the plan must show rows dropped.
  cfg = _preset(path, init_from=ckpt, **{"plan.tpu": tpu,
                                         "data.train_path": real_files.data_file(
                                             "aime24_test.jsonl")})
  for set_name in ("math500", "aime24", "aime25"):
    cfg.eval.sets[set_name].path = _real_sets(set_name)
  out = pipeline.plan(experiment.validate(cfg), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists(), "a dry run wrote files"
  with open(real_files.CONFIGS[size]) as f:
    real = json.load(f)
  assert f"d_model={real['hidden_size']} layers={real['num_hidden_layers']}" in out
  assert "vocab=151936" in out
  assert "dtype=bfloat16 param_dtype=bfloat16 remat=full" in out
  assert f"chips of {tpu}" in out
  # Paper A's OPSD stage fits both slices; Paper B's full fine-tuning of 8B fits a v5p-8, and
  # the plan says it does not fit a v5e-16's 16 GiB chips (the preset's docstring says so too).
  table = [l.split() for l in out.splitlines() if l.startswith("   ")]
  if name == "paper_a_qwen3_1p7b":
    assert {r[0]: r[-1] for r in table} == {"opsd": "yes", "eval": "yes"}, out
  else:
    grid_line = next(l for l in out.splitlines() if l.startswith("grid:"))
    assert grid_line.endswith(f"fits {tpu}: " + ("yes" if tpu == "v5p-8" else "NO")), grid_line
  # Every set is read and fitted before any compute, and the plan says so.
  data_lines = [l for l in out.splitlines() if l.startswith("data ")]
  assert {l.split(":")[0] for l in data_lines} == {"data train", "data math500", "data aime24",
                                                    "data aime25"}
  train_line = next(l for l in data_lines if l.startswith("data train"))
  assert "30 rows read" in train_line and "teacher prompt over 2048 tokens" in train_line, \
      train_line
  assert any("500 rows read" in l and "all 500 rows fit" in l for l in data_lines), data_lines


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_run_builds_what_the_dry_run_planned(name, tmp_path):
  """With init_from set, the preset's dtype / param_dtype / remat / LoRA apply to the loaded
  model (a stand-in checkpoint: the preset's real config.json shrunk, random bf16 weights)."""
  path, size = PRESETS[name]
  with open(real_files.CONFIGS[size]) as f:
    real = json.load(f)
  small = dict(real, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  ckpt = tmp_path / "ckpt"
  torch.manual_seed(0)
  hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{
      k: v for k, v in small.items() if k not in ("architectures", "transformers_version")}))
  hf_model.to(torch.bfloat16).save_pretrained(str(ckpt), max_shard_size="3MB")
  real_files.qwen3_tokenizer_dir(str(ckpt))
  assert os.path.exists(ckpt / "model.safetensors.index.json")
  train = tmp_path / "train.jsonl"
  _write_rows(real_files.data_file("gsm8k_train.jsonl"), train, 8)
  test = tmp_path / "math500.jsonl"
  _write_rows(real_files.data_file("math500_test.jsonl"), test, 4)
  cfg = _preset(path, init_from=str(ckpt), **{"data.train_path": str(train)})
  cfg.eval.sets = {"math500": dict(path=str(test), num_problems=-1, samples_per_problem=-1)}
  cfg.lora.rank = 4
  cfg = experiment.validate(cfg)
  run = pipeline.setup(cfg, str(tmp_path / "work"))
  try:
    proc, _ = helpers.run(path, tmp_path / "dry", "--dry_run", f"--config.init_from={ckpt}",
                          f"--config.data.train_path={train}",
                          f"--config.eval.sets.math500.path={test}",
                          "--config.eval.sets.aime24.path=" + str(test),
                          "--config.eval.sets.aime25.path=" + str(test),
                          "--config.lora.rank=4", timeout=300)
    helpers.assert_ok(proc)
    m = run.model_cfg
    planned = (f"d_model={m.d_model} layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} "
               f"vocab={m.vocab_size} params={m.num_params() / 1e6:.2f}M dtype={m.dtype} "
               f"param_dtype={m.param_dtype} remat={m.remat}")
    assert planned in proc.stdout, proc.stdout
    assert (m.dtype, m.param_dtype, m.remat) == ("bfloat16", "bfloat16", "full")
    params = pipeline.initial_params(run)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    # What a stage trains: the run's config with the lora section on top, as the plan has it.
    trained = lora.with_config(m, cfg.lora)
    assert (trained.lora_rank, trained.lora_alpha) == (4, cfg.lora.alpha)
    assert trained.tie_embeddings == (size == "1p7b")
  finally:
    run.grader.close()
    run.logger.close()


def test_an_architecture_key_the_checkpoint_overrides_is_an_error(tmp_path):
  ckpt = _checkpoint_dir(tmp_path / "ckpt", real_files.CONFIGS["8b"])
  cfg = _preset(PAPER_B, init_from=ckpt)
  cfg.model.d_model = 2048
  with pytest.raises(config_lib.ConfigError, match=r"model.d_model=2048 .* 4096"):
    pipeline.model_config(cfg)


def _write_rows(source, dest, n, skip=0):
  with open(source) as f:
    rows = [next(f) for _ in range(skip + n)][skip:]
  with open(dest, "w") as f:
    f.writelines(rows)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True])  # untied (Qwen3-8B's form): _tiny_checkpoint below
def test_scaled_down_real_run_end_to_end(tied, tmp_path):
  """RLVR -> OPSD (thinking-off student, thinking-on teacher) -> evaluation -> HF export on a
  tiny random Qwen3 in the Hub's form with the real tokenizer, template and data."""
  config = dict(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=40_960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645)
  ckpt = tmp_path / "Qwen3-tiny"
  torch.manual_seed(0)
  transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config)).to(
      torch.bfloat16).save_pretrained(str(ckpt), max_shard_size="4MB")
  real_files.qwen3_tokenizer_dir(str(ckpt))
  assert len([f for f in os.listdir(ckpt) if f.endswith(".safetensors")]) > 1
  train, math500, gsm8k = tmp_path / "train.jsonl", tmp_path / "m.jsonl", tmp_path / "g.jsonl"
  _write_rows(real_files.data_file("gsm8k_train.jsonl"), train, 24)
  with open(train, "a") as f:  # AIME24 rows 1-2 in GSM8K's layout: teacher prompts > 2,048 tokens
    for line in open(real_files.data_file("aime24_test.jsonl")).readlines()[1:3]:
      row = json.loads(line)
      f.write(json.dumps({"question": row["problem"],
                          "answer": f"{row['solution']}\n#### {row['answer']}"}) + "\n")
  _write_rows(real_files.data_file("math500_test.jsonl"), math500, 4)
  _write_rows(real_files.data_file("gsm8k_test.jsonl"), gsm8k, 4)
  workdir = tmp_path / "work"
  proc, seconds = helpers.run(
      PAPER_A, workdir, f"--config.init_from={ckpt}", f"--config.data.train_path={train}",
      f"--config.eval.sets.math500.path={math500}", f"--config.eval.sets.aime24.path={gsm8k}",
      f"--config.eval.sets.aime25.path={gsm8k}",
      "--config.stages=('rlvr', 'opsd')", "--config.model.dtype=float32",
      "--config.model.param_dtype=float32", "--config.model.remat=none",
      "--config.optimizer.master_weights=False", "--config.lora.rank=4",
      "--config.rlvr.steps=2", "--config.rlvr.prompts_per_step=2", "--config.rlvr.group_size=2",
      "--config.rlvr.mini_batches=1", "--config.rlvr.overlong_penalty=1.0",
      "--config.rlvr.overlong_buffer=8",
      "--config.opsd.steps=2", "--config.opsd.prompts_per_step=2", "--config.opsd.mini_batches=1",
      "--config.opsd.checkpoint_every=1",
      "--config.sampling.max_new_tokens=8", "--config.sampling.continuous_batching=False",
      "--config.eval.max_new_tokens=8", "--config.eval.samples_per_problem=1",
      "--config.eval.sets.aime24.samples_per_problem=2",
      "--config.eval.sets.aime25.samples_per_problem=1", "--config.eval.batch_size=8",
      "--config.mesh.fsdp=1", "--config.loss_chunk=64", timeout=600)
  helpers.assert_ok(proc)
  assert seconds < 180, f"the scaled-down real run took {seconds:.0f} s"
  with open(workdir / "results.json") as f:
    results = json.load(f)
  for stage, thinking in (("init", True), ("rlvr", True), ("opsd", False)):
    r = results[stage]
    assert set(r["benchmarks"]) == {"math500", "aime24", "aime25"}, r.keys()
    assert r["benchmarks"]["math500"]["settings"]["thinking"] is thinking
    assert r["benchmarks"]["aime24"]["count"] == 8  # 4 problems x 2 samples
  # The two rows whose teacher prompts cannot fit were dropped at load, not mid-OPSD.
  fit = results["data"]["train"]["fit"]
  assert (fit["rows"], fit["kept"]) == (26, 24), fit
  assert fit["dropped"] == {"teacher prompt over 2048 tokens": 2}, fit
  assert "teacher prompt over 2048 tokens" in proc.stdout
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  opsd = [r for r in records if r.get("stage") == "opsd"]
  assert opsd and all(r["opsd/trained_tokens"] > 0 for r in opsd)  # rollout_filter all
  # The export: transformers loads it, with the same logits and the same tokenisation.
  export = workdir / "opsd" / "hf"
  ours_cfg, ours = hf.load(str(export))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export),
                                                               dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(0, 151_669, (2, 12))
  with torch.no_grad():
    theirs = hf_model(torch.tensor(tokens)).logits.numpy()
  mine = np.asarray(model.forward(ours_cfg, ours, tokens))
  np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
  text = "Natalia sold clips to 48 of her friends in April. <think>\n</think>\n\n\\boxed{72}"
  from opsd_jax import tokenizer as tokenizer_lib
  assert tokenizer_lib.load("hf", str(export)).encode(text) == hf_tok(
      text, add_special_tokens=False)["input_ids"]


def test_rows_that_cannot_fit_match_an_independent_count(tmp_path):
  """MATH500 and AIME24 as OPSD training data with a 1,024-token prompt limit: the rows dropped
  are those whose teacher prompt, rendered and tokenised by transformers, is longer."""
  from opsd_jax import fit, prompts
  from opsd_jax import tokenizer as tokenizer_lib
  from opsd_jax import data
  directory = real_files.qwen3_tokenizer_dir(str(tmp_path / "tok"))
  tok = tokenizer_lib.load("hf", directory)
  template = tokenizer_lib.chat_template(tok, "checkpoint")
  hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
  o = config_lib.default_config().opsd  # thinking on for both: no closed thought appended
  for name in ("math500_test.jsonl", "aime24_test.jsonl"):
    rows, _ = data.load(real_files.data_file(name), require_reference=True)
    kept, report = fit.fit(name, rows, tok, template, student_modes={True}, prompt_limit=1024,
                           teacher=o)
    too_long = 0
    for r in rows:
      content = prompts.teacher_content(r["question"], r["reference"], "full", r["answer"])
      ids = hf_tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                       add_generation_prompt=True, enable_thinking=True)
      ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
      too_long += len(ids) > 1024
    assert too_long > 0 and report.rows - report.kept == too_long, (name, report, too_long)
    assert report.dropped == {"teacher prompt over 1024 tokens": too_long}


EVAL = os.path.join(REPO, "experiments", "eval_math.py")


def _tiny_checkpoint(directory):
  """An untied tiny Qwen3 at the real vocabulary, bf16 shards + index, real tokenizer files."""
  torch.manual_seed(0)
  transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)).to(
          torch.bfloat16).save_pretrained(str(directory), max_shard_size="6MB")
  real_files.qwen3_tokenizer_dir(str(directory))
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  return str(directory)


def test_eval_only_resumes_at_the_chunk_it_stopped_at(tmp_path):
  """experiments/eval_math.py on a checkpoint: every benchmark evaluated, per-chunk files; a
  rerun after losing the tail of one benchmark keeps the finished chunks and samples only the
  lost ones, with the same keys (so the same responses)."""
  ckpt = _tiny_checkpoint(tmp_path / "ckpt")
  math500, aime24 = tmp_path / "math500.jsonl", tmp_path / "aime24.jsonl"
  _write_rows(real_files.data_file("math500_test.jsonl"), math500, 6)
  _write_rows(real_files.data_file("aime24_test.jsonl"), aime24, 2)
  workdir = tmp_path / "work"
  args = [f"--config.init_from={ckpt}", f"--config.eval.sets.math500.path={math500}",
          f"--config.eval.sets.aime24.path={aime24}", f"--config.eval.sets.aime25.path={aime24}",
          "--config.eval.max_new_tokens=6", "--config.eval.batch_size=4",
          "--config.eval.sets.math500.samples_per_problem=2",
          "--config.eval.sets.aime24.samples_per_problem=2", "--config.model.dtype=float32",
          "--config.sampling.continuous_batching=False", "--config.eval.thinking=off"]
  proc, _ = helpers.run(EVAL, workdir, *args, timeout=300)
  helpers.assert_ok(proc)
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"init", "data"}
  for name, count in (("math500", 12), ("aime24", 4), ("aime25", 32)):  # aime25: avg@16
    r = results["init"]["benchmarks"][name]
    assert r["count"] == count and r["settings"]["thinking"] is False, (name, r)
  assert "## Each benchmark" in (workdir / "results.md").read_text()
  # math500: 6 problems x 2 samples in chunks of 2 problems -> a header and 3 chunk lines.
  path = workdir / "eval" / "init" / "math500.jsonl"
  header, *chunks = path.read_text().splitlines()
  assert len(chunks) == 3
  first = json.loads(chunks[0])
  first["texts"] = ["kept"] * len(first["texts"])  # a mark the rerun must not overwrite
  path.write_text("\n".join([header, json.dumps(first), chunks[1][:25]]))  # chunk 1 torn
  (workdir / "results.json").unlink()
  proc, _ = helpers.run(EVAL, workdir, *args, timeout=300)
  helpers.assert_ok(proc)
  header2, *again = path.read_text().splitlines()
  assert header2 == header and len(again) == 3
  assert json.loads(again[0])["texts"] == ["kept"] * len(first["texts"])
  assert [json.loads(c) for c in again[1:]] == [json.loads(c) for c in chunks[1:]]


def test_bad_real_inputs_are_one_line_before_training(tmp_path):
  """A corrupt weight shard of init_from, a missing benchmark file: one line naming the file or
  key, exit 2, and no stage started."""
  ckpt = _tiny_checkpoint(tmp_path / "ckpt")
  math500 = tmp_path / "math500.jsonl"
  _write_rows(real_files.data_file("math500_test.jsonl"), math500, 2)
  args = [f"--config.init_from={ckpt}", f"--config.eval.sets.math500.path={math500}",
          f"--config.eval.sets.aime24.path={math500}", "--config.model.dtype=float32",
          "--config.eval.max_new_tokens=4", "--config.sampling.continuous_batching=False"]
  proc, _ = helpers.run(EVAL, tmp_path / "w1", *args,
                        f"--config.eval.sets.aime25.path={tmp_path / 'nope.jsonl'}")
  assert proc.returncode == 2
  line = helpers.error_line(proc)
  assert "eval.sets.aime25.path: no file at" in line and "nope.jsonl" in line, line
  weights = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[0]
  with open(os.path.join(ckpt, weights), "r+b") as f:
    f.truncate(100)
  proc, _ = helpers.run(EVAL, tmp_path / "w2", *args,
                        f"--config.eval.sets.aime25.path={math500}")
  assert proc.returncode == 2
  line = helpers.error_line(proc)
  assert weights in line, line
  assert not os.path.exists(tmp_path / "w2" / "results.json")
