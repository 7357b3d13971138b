"""Composes the stages of an experiment: set-up once, then SFT -> RLVR -> OPSD, each evaluated.

`run(cfg, workdir)` is what `main.py` calls. A stage that finished leaves
`<workdir>/<stage>/final` (its parameters) and its evaluation in results.json, so a rerun skips it;
a stage that was interrupted resumes from its own last checkpoint inside its loop. Every file
written here is renamed into place when complete (metrics.write_text_atomic).

What stops a run, and how main.py reports it (one line each): INPUT_ERRORS (bad files, data,
tokenizer, checkpoints: exit 2), NonFiniteError (exit 1, the last good checkpoint kept),
Preempted (SIGTERM: the current step saved, exit 143; rerunning resumes).

Multi-host (one process per host, see parallel.initialize_distributed): every process runs this
same code. Each reads its own rows of every batch; the stage loops gather the batch's records,
sample and grade them globally and hold the same host arrays, so all take the same decisions;
process 0's results.json decides what is already done; only process 0 writes files and prints;
orbax checkpoints are saved and restored by all. The workdir must be one directory all hosts see
(a shared or gcsfuse-mounted one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from opsd_jax import checkpoint, config as config_lib, evaluate, metrics, parallel
from opsd_jax import rollouts as rollouts_lib
from opsd_jax import tokenizer as tokenizer_lib
from opsd_jax.data import jsonl
from opsd_jax.train.loop import NonFiniteError, Preempted  # noqa: F401  (main.py catches them)


class PipelineError(RuntimeError):
  """A problem with the run's inputs (files, checkpoints) found before or during a stage."""


# Bad input found while running: each message names the file, row or key.
INPUT_ERRORS = (PipelineError, config_lib.ConfigError, checkpoint.CheckpointError,
                jsonl.DataError, tokenizer_lib.TokenizerError)


@dataclasses.dataclass
class Run:
  """Everything a stage loop needs besides the parameters."""
  cfg: Any
  workdir: str
  model_cfg: config_lib.ModelConfig
  mesh: Any
  tok: Any
  template: Any  # the chat template every prompt is rendered with (student and teacher alike)
  train: list[dict]
  test: list[dict]
  logger: metrics.Logger
  grader: Any

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def _load_data(cfg, workdir):
  if cfg.data.kind == "toy":
    from opsd_jax.data import toy
    train, test = toy.make_splits(cfg.seed, cfg.data.num_train, cfg.data.num_test,
                                  cfg.data.difficulty)
    # Multi-host: process 0 trains the tokenizer into the workdir, the others then load it.
    if not parallel.is_primary():
      parallel.sync("toy_tokenizer")
    tok = toy.build_tokenizer(train + test, workdir)
    if parallel.is_primary():
      parallel.sync("toy_tokenizer")
    return train, test, tok
  for key in ("train_path", "test_path"):
    if not os.path.isfile(cfg.data[key]):
      raise PipelineError(f"data.{key}: no file at {cfg.data[key]!r}")
  if cfg.tokenizer.kind == "toy":
    raise PipelineError("tokenizer.kind='toy' is trained on the toy task's text; with "
                        "data.kind='jsonl' set tokenizer.kind to 'sentencepiece' or 'hf'")
  train, _ = jsonl.read(cfg.data.train_path, cfg.data.format, on_bad_row=cfg.data.on_bad_row)
  test, _ = jsonl.read(cfg.data.test_path, cfg.data.format, on_bad_row=cfg.data.on_bad_row)
  tok = tokenizer_lib.load(cfg.tokenizer.kind, cfg.tokenizer.path)
  return train, test[:cfg.data.num_test], tok


def _model_config(cfg, tok):
  if cfg.init_from:
    from opsd_jax import hf
    model_cfg = hf.read_config(cfg.init_from)
  else:
    section = cfg.model.to_dict()
    if section["vocab_size"] == 0:  # toy: the model's vocabulary is the tokenizer's
      section["vocab_size"] = tok.vocab_size
    model_cfg = config_lib.ModelConfig.from_dict(section)
  if tok.vocab_size > model_cfg.vocab_size:
    raise PipelineError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}: they do not belong together")
  return model_cfg


def setup(cfg, workdir) -> Run:
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.mesh_from_config(cfg.mesh)
  train, test, tok = _load_data(cfg, workdir)
  model_cfg = _model_config(cfg, tok)
  from opsd_jax import verify
  grader = verify.Grader(timeout_s=cfg.eval.verify_timeout_s)
  metrics.write_text_atomic(os.path.join(workdir, "config.json"),
                            cfg.to_json_best_effort(indent=2))
  template = tokenizer_lib.chat_template(tok, cfg.tokenizer.chat_template)
  return Run(cfg, workdir, model_cfg, mesh, tok, template, train, test, metrics.Logger(workdir),
             grader)


def initial_params(run: Run):
  if run.cfg.init_from:
    from opsd_jax import hf
    _, params = hf.load(run.cfg.init_from, mesh=run.mesh)
    return params
  return parallel.init_params(run.model_cfg, jax.random.key(run.cfg.seed), run.mesh)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_params(run: Run, params, label: str, thinking: bool = True) -> dict[str, Any]:
  """Held-out accuracy and response length, with the settings stated in the result. `thinking`
  is the student's mode (on: the Qwen3 thinking convention; off: the grid's thinking-off arm)."""
  e = run.cfg.eval
  problems = run.test[:e.num_problems]
  t0 = time.time()
  ro = rollouts_lib.sample_and_grade(
      run, params, problems, num_samples=e.samples_per_problem, temperature=e.temperature,
      top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens,
      rng=jax.random.key(run.cfg.seed + 10_000), batch_size=e.batch_size, thinking=thinking)
  summary = evaluate.summarize(ro.problem_ids, ro.correct, ro.lengths, ro.truncated, ro.texts)
  summary.update(label=label, seconds=round(time.time() - t0, 1),
                 settings=dict(num_problems=len(problems), samples=e.samples_per_problem,
                               temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                               max_new_tokens=e.max_new_tokens, thinking=thinking))
  return summary


def _results_path(run):
  return os.path.join(run.workdir, "results.json")


def load_results(run) -> dict[str, Any]:
  path = _results_path(run)
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise PipelineError(f"{path} is not valid JSON ({e}); delete it to re-evaluate the "
                          "stages") from e
  return {}


def save_results(run, results):
  metrics.write_text_atomic(_results_path(run), json.dumps(results, indent=2))


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


def _stage_loop(stage):
  if stage == "sft":
    from opsd_jax.train import sft
    return sft.train
  if stage == "rlvr":
    from opsd_jax.train import rlvr
    return rlvr.train
  from opsd_jax.train import opsd
  return opsd.train


def run(cfg, workdir):
  run_ = setup(cfg, workdir)
  # Multi-host: process 0's files decide what is done, for every process alike.
  results = parallel.broadcast_object(load_results(run_) if parallel.is_primary() else None)
  params = None
  try:
    for stage in cfg.stages:
      final_dir = os.path.join(run_.stage_dir(stage), "final")
      if parallel.broadcast_object(stage in results and checkpoint.exists(final_dir)):
        _say(f"{stage}: already done, loading its final parameters")
        params = checkpoint.load_params(final_dir, parallel.param_shardings(run_.model_cfg,
                                                                             run_.mesh))
        continue
      if params is None:
        params = initial_params(run_)
        if "init" not in results:
          results["init"] = evaluate_params(run_, params, "init")
          save_results(run_, results)
          _print_eval("init", results["init"])
      t0 = time.time()
      params = _stage_loop(stage)(run_, params)
      checkpoint.save_params(final_dir, params)
      results[stage] = evaluate_params(run_, params, stage)
      results[stage]["train_seconds"] = round(time.time() - t0, 1)
      save_results(run_, results)
      _print_eval(stage, results[stage])
    if parallel.is_primary():
      report(run_, results)
    if cfg.grid.rollout_filters:  # OPSD branches from the last stage's parameters
      from opsd_jax import grid
      grid.run(run_, params, results)
  finally:
    run_.grader.close()
    run_.logger.close()


def _say(text):
  """Progress lines come from process 0 only (multi-host)."""
  if parallel.is_primary():
    print(text, flush=True)


def _print_eval(stage, r):
  _say(f"[eval {stage}] accuracy={r['accuracy']:.3f} mean_length={r['mean_length']:.1f} "
        f"(correct {r['mean_length_correct']:.1f}, incorrect {r['mean_length_incorrect']:.1f}) "
        f"truncated={r['truncation_rate']:.3f} markers/response={r['hesitation_mean_per_response']:.2f}")


def report(run: Run, results: dict[str, Any]):
  """results.md (a table of the stages) and plots, from results.json and metrics.jsonl."""
  order = ["init"] + [s for s in run.cfg.stages if s in results]
  rows = [dict(stage=s, **{k: v for k, v in results[s].items() if not isinstance(v, dict)})
          for s in order if s in results]
  columns = ["stage", "accuracy", "mean_length", "mean_length_correct", "mean_length_incorrect",
             "truncation_rate", "hesitation_mean_per_response", "train_seconds"]
  table = evaluate.results_table(rows, columns)
  settings = results[order[-1]]["settings"]
  text = (f"# {run.cfg.name}\n\nHeld-out evaluation after each stage ({settings}).\n\n"
          f"{table}\n")
  metrics.write_text_atomic(os.path.join(run.workdir, "results.md"), text)
  evaluate.plot_stages(rows, os.path.join(run.workdir, "stages.png"))
  evaluate.plot_curves(run.logger.records(), os.path.join(run.workdir, "curves.png"),
                       metrics=("loss", "accuracy", "completions/mean_length"),
                       series_key="stage",
                       titles=("train loss", "rollout accuracy", "rollout length (tokens)"))
  print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def plan(cfg, workdir) -> str:
  """Validates everything that can be checked without training and returns the plan, with the
  per-device memory of each stage (memory.py) on plan.tpu's slice or on this machine's devices."""
  from opsd_jax import memory
  lines = [f"experiment {cfg.name}: stages {' -> '.join(cfg.stages)}; workdir {workdir}"]
  if cfg.init_from:
    from opsd_jax import hf
    if not os.path.isdir(cfg.init_from):
      raise PipelineError(f"init_from: no Hugging Face directory at {cfg.init_from!r}")
    model_cfg = hf.read_config(cfg.init_from)
    # The checkpoint fixes the architecture; the experiment's numerics still apply.
    model_cfg = model_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                  remat=cfg.model.remat)
  else:
    section = cfg.model.to_dict()
    if section["vocab_size"] == 0:
      section["vocab_size"] = 512  # toy: set by the tokenizer trained at run time
    model_cfg = config_lib.ModelConfig.from_dict(section)
  tpu = memory.tpu_slice(cfg.plan.tpu) if cfg.plan.tpu else None
  devices = tpu.chips if tpu else jax.device_count()
  mesh_shape = parallel.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
  lines.append(f"model: {model_cfg.family} d_model={model_cfg.d_model} layers="
               f"{model_cfg.n_layers} heads={model_cfg.n_heads}/{model_cfg.n_kv_heads} "
               f"vocab={model_cfg.vocab_size} params={model_cfg.num_params() / 1e6:.2f}M "
               f"dtype={model_cfg.dtype} param_dtype={model_cfg.param_dtype} "
               f"remat={model_cfg.remat} optimizer state={cfg.optimizer.state_dtype}"
               f"{' + float32 master weights' if cfg.optimizer.master_weights else ''}")
  lines.append(f"mesh (data, fsdp, tensor) = {mesh_shape} over {devices} "
               f"{'chips of ' + tpu.name if tpu else 'devices'}")
  plans = memory.plan(cfg, model_cfg, mesh_shape)
  for p in plans[:-1]:
    lines.append(f"stage {p.stage}: {cfg[p.stage].steps} steps, {p.shape}; memory per device "
                 f"~{p.total / memory.GiB:.3f} GiB")
  lines.append(f"eval: {plans[-1].shape}; memory per device ~{plans[-1].total / memory.GiB:.3f} "
               "GiB")
  lines.extend(memory.format_plan(plans, mesh_shape, tpu))
  g = cfg.grid
  if g.rollout_filters:
    from opsd_jax import grid
    n = len(grid.branches(g))  # split_direction runs once per seed
    lines.append(f"grid: {n} OPSD branches of {cfg.opsd.steps} steps from the last stage "
                 f"(filters {list(g.rollout_filters)} x divergences {list(g.divergences)}, "
                 f"thinking-off arms {list(g.thinking_off_arms)}, x seeds {list(g.seeds)}); "
                 + ("each branch plans as stage opsd above" if "opsd" in cfg.stages else
                    "memory per device ~"
                    f"{memory.plan_stage(cfg, model_cfg, 'opsd', mesh_shape).total / memory.GiB:.3f}"
                    " GiB"))
  return "\n".join(lines)
