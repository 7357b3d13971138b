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
import os
import time
from typing import Any

import jax

from opsd_jax import benchmarks, checkpoint, config as config_lib, fit, grid, grid_report, hf, metrics
from opsd_jax import parallel, remote
from opsd_jax import results as results_lib
from opsd_jax import rollouts as rollouts_lib
from opsd_jax import tokenizer as tokenizer_lib
from opsd_jax.data import jsonl
from opsd_jax.train.loop import NonFiniteError, Preempted  # noqa: F401  (main.py catches them)


class PipelineError(RuntimeError):
  """A problem with the run's inputs (files, checkpoints) found before or during a stage."""


# Bad input found while running: each message names the file, row or key.
INPUT_ERRORS = (PipelineError, config_lib.ConfigError, checkpoint.CheckpointError,
                results_lib.ResultsError, hf.CheckpointFormatError, remote.RemotePathError,
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
  eval_sets: dict[str, list[dict]]  # benchmark name -> its problems (benchmarks.py)
  logger: metrics.Logger
  grader: Any
  sampler: rollouts_lib.Sampler  # the run's model config; a stage with LoRA derives its own
  data_report: dict = dataclasses.field(default_factory=dict)  # rows dropped at load, per set

  @property
  def test(self) -> list[dict]:
    """The first benchmark's problems."""
    return next(iter(self.eval_sets.values()))

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def _local(cfg, path):
  """A remote path (gs://...) copied once to this host's cache; local paths unchanged."""
  return remote.localize(path, cfg.cache_dir) if path and remote.is_remote(path) else path


def eval_set_paths(cfg) -> dict[str, str]:
  """Benchmark name -> file: eval.sets, else data.test_path as one set named after its file."""
  if cfg.eval.sets:
    return {name: cfg.eval.sets[name].path for name in cfg.eval.sets}
  if not cfg.data.test_path:
    return {}
  stem = os.path.basename(cfg.data.test_path.rstrip("/")).split(".")[0]
  return {stem or "test": cfg.data.test_path}


def tokenizer_path(cfg) -> str:
  """tokenizer.path, or the init_from checkpoint's own tokenizer files when it is empty."""
  return cfg.tokenizer.path or (cfg.init_from if cfg.tokenizer.kind == "hf" else "")


def load_tokenizer(cfg):
  path = _local(cfg, tokenizer_path(cfg))
  if not path:
    raise PipelineError(f"tokenizer.path must be set when tokenizer.kind={cfg.tokenizer.kind!r} "
                        "(or init_from, whose tokenizer files are then used)")
  return tokenizer_lib.load(cfg.tokenizer.kind, path)


def _read_rows(cfg, path, what, require_reference):
  from opsd_jax import data
  local = _local(cfg, path)
  if not os.path.exists(local):
    raise PipelineError(f"{what}: no file at {path!r}")
  fields = {k: v for k, v in cfg.data.fields.items() if v} or None
  rows, report = data.load(local, fields=fields, fmt=cfg.data.format,
                           on_bad_row=cfg.data.on_bad_row, require_reference=require_reference)
  return rows, report


def load_data(cfg, workdir):
  """(train rows, {benchmark: rows}, tokenizer, {set: load counts})."""
  if cfg.data.kind == "toy":
    from opsd_jax.data import toy, toy_strategy
    if cfg.data.family == "strategy":
      train, test = toy_strategy.make_splits(cfg.seed, cfg.data.num_train, cfg.data.num_test)
    else:
      train, test = toy.make_splits(cfg.seed, cfg.data.num_train, cfg.data.num_test,
                                    cfg.data.difficulty)
    # Multi-host: process 0 trains the tokenizer into the workdir, the others then load it.
    if not parallel.is_primary():
      parallel.sync("toy_tokenizer")
    tok = toy.build_tokenizer(train + test, workdir)
    if parallel.is_primary():
      parallel.sync("toy_tokenizer")
    return train, {"toy": test}, tok, {}
  if cfg.tokenizer.kind == "toy":
    raise PipelineError("tokenizer.kind='toy' is trained on the toy task's text; with "
                        "data.kind='jsonl' set tokenizer.kind to 'sentencepiece' or 'hf'")
  tok = load_tokenizer(cfg)
  counts = {}
  train = []
  if cfg.data.train_path:
    # OPSD's teacher needs each training row's reference solution; RLVR and evaluation do not.
    train, report = _read_rows(cfg, cfg.data.train_path, "data.train_path", _opsd_runs(cfg))
    counts["train"] = dataclasses.asdict(report)
  sets = {}
  for name, path in eval_set_paths(cfg).items():
    what = f"eval.sets.{name}.path" if cfg.eval.sets else "data.test_path"
    rows, report = _read_rows(cfg, path, what, False)
    sets[name] = rows[:cfg.data.num_test]
    counts[name] = dataclasses.asdict(report)
  return train, sets, tok, counts


def _opsd_runs(cfg) -> bool:
  """OPSD trains in this run, as a stage or as the grid's branches."""
  return "opsd" in cfg.stages or bool(cfg.grid.rollout_filters)


def model_config(cfg, tok_vocab_size: int | None = None) -> config_lib.ModelConfig:
  """The ModelConfig the run trains, the same for a run and its --dry_run: with init_from the
  checkpoint's architecture and the experiment's numerics (model.dtype, param_dtype, remat);
  else the model section (vocab_size 0: the tokenizer's vocabulary). LoRA (lora.*) is applied
  on top by each stage (train/loop.py), as the plan does (memory.plan_stage)."""
  if not cfg.init_from:
    section = cfg.model.to_dict()
    if section["vocab_size"] == 0:  # toy: the model's vocabulary is the tokenizer's
      if tok_vocab_size is None:
        raise PipelineError("model.vocab_size=0 takes the tokenizer's size, and no tokenizer "
                            "was given")
      section["vocab_size"] = tok_vocab_size
    return config_lib.ModelConfig.from_dict(section)
  ckpt = hf.read_config(_local(cfg, cfg.init_from))
  defaults = config_lib.model_config()
  for key, value in cfg.model.items():
    if key in ("dtype", "param_dtype", "remat") or value == defaults[key]:
      continue
    if value != getattr(ckpt, key):
      raise config_lib.ConfigError(
          f"model.{key}={value!r} but init_from's config.json says {getattr(ckpt, key)!r}: the "
          f"checkpoint fixes the architecture (leave model.{key} unset)")
  return ckpt.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                      remat=cfg.model.remat)


def _check_vocab(model_cfg, tok):
  if tok.vocab_size > model_cfg.vocab_size:
    raise PipelineError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}: they do not belong together")


def fit_rows(cfg, model_cfg, tok, template, train, sets):
  """Drops the rows whose prompts cannot fit (fit.py); returns (train, sets, reports)."""
  s = cfg.sampling
  limit = fit.limit(s.prompt_buckets, model_cfg.max_position, s.max_new_tokens)
  opsd_runs = _opsd_runs(cfg)
  modes = ({True} if "rlvr" in cfg.stages else set()) | (
      {bool(cfg.opsd.student_thinking)} if opsd_runs else set())
  reports = {}
  if train:
    train, reports["train"] = fit.fit("train", train, tok, template, student_modes=modes or {True},
                                      prompt_limit=limit, teacher=cfg.opsd if opsd_runs else None)
    if not train:
      raise PipelineError(f"data.train_path: no row fits ({reports['train'].line()})")
  eval_limit = fit.limit(s.prompt_buckets, model_cfg.max_position, cfg.eval.max_new_tokens)
  eval_modes = {benchmarks.thinking_mode(cfg, True)}
  if opsd_runs:
    eval_modes.add(benchmarks.thinking_mode(cfg, bool(cfg.opsd.student_thinking)))
  if cfg.grid.thinking_off_arms:
    eval_modes.add(benchmarks.thinking_mode(cfg, False))
  for name, rows in list(sets.items()):
    sets[name], reports[name] = fit.fit(name, rows, tok, template, student_modes=eval_modes,
                                        prompt_limit=eval_limit)
    if not sets[name]:
      raise PipelineError(f"eval set {name}: no problem fits ({reports[name].line()})")
  return train, sets, reports


def setup(cfg, workdir) -> Run:
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.mesh_from_config(cfg.mesh)
  train, sets, tok, counts = load_data(cfg, workdir)
  model_cfg = model_config(cfg, tok.vocab_size)
  _check_vocab(model_cfg, tok)
  from opsd_jax import grader as grader_lib
  grader = grader_lib.Grader(timeout_s=cfg.eval.verify_timeout_s,
                             after_think=cfg.eval.answer_after_think)
  metrics.write_text_atomic(os.path.join(workdir, "config.json"),
                            cfg.to_json_best_effort(indent=2))
  template = tokenizer_lib.chat_template(tok, cfg.tokenizer.chat_template)
  train, sets, reports = fit_rows(cfg, model_cfg, tok, template, train, sets)
  data_report = {name: dict(counts.get(name, {}), fit=r.to_dict()) for name, r in reports.items()}
  for r in reports.values():
    results_lib.say(f"data {r.line()}")
  sampler = rollouts_lib.Sampler.build(model_cfg, mesh, tok, template, grader, cfg.sampling)
  return Run(cfg, workdir, model_cfg, mesh, tok, template, train, sets, metrics.Logger(workdir),
             grader, sampler, data_report)


def initial_params(run: Run):
  if run.cfg.init_from:
    # Loaded in the run's parameter dtype (the experiment's, not the file's).
    _, params = hf.load(_local(run.cfg, run.cfg.init_from), dtype=run.model_cfg.param_dtype,
                        mesh=run.mesh)
    return params
  return parallel.init_params(run.model_cfg, jax.random.key(run.cfg.seed), run.mesh)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


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
  results = parallel.broadcast_object(
      results_lib.load(run_.workdir) if parallel.is_primary() else None)
  results["data"] = run_.data_report
  params = None
  try:
    for stage in cfg.stages:
      if stage == "eval":  # evaluation only: init_from (or the random init) on every benchmark
        params = _init_evaluated(run_, params, results)
        continue
      final_dir = os.path.join(run_.stage_dir(stage), "final")
      if parallel.broadcast_object(stage in results and checkpoint.exists(final_dir)):
        results_lib.say(f"{stage}: already done, loading its final parameters")
        params = checkpoint.load_params(final_dir, run_.sampler.param_shardings)
        _export(run_, stage, params)
        grid.after_stage(run_, stage, params, results)
        continue
      params = _init_evaluated(run_, params, results)
      t0 = time.time()
      params = _stage_loop(stage)(run_, params)
      checkpoint.save_params(final_dir, params)
      _export(run_, stage, params)
      results[stage] = benchmarks.evaluate_stage(run_, params, stage)
      results[stage]["train_seconds"] = round(time.time() - t0, 1)
      results_lib.save(run_.workdir, results)
      results_lib.print_eval(stage, results[stage])
      grid.after_stage(run_, stage, params, results)
    if parallel.is_primary():
      results_lib.report(run_, results)
    if cfg.grid.rollout_filters:  # OPSD branches from the last stage's parameters
      grid.run(run_, params, results)
      grid_report.report(run_.workdir, results)
  finally:
    run_.grader.close()
    run_.logger.close()


def _init_evaluated(run_, params, results):
  """The run's starting parameters, evaluated once (results['init'])."""
  if params is not None:
    return params
  params = initial_params(run_)
  if "init" not in results:
    # In the mode the first stage's student samples in, so the stage compares like with like.
    first = next((s for s in run_.cfg.stages if s != "eval"), "eval")
    results["init"] = benchmarks.evaluate_params(run_, params, "init",
                                                 benchmarks.stage_thinking(run_.cfg, first))
    results_lib.save(run_.workdir, results)
    results_lib.print_eval("init", results["init"])
  return params


def _export(run_, stage, params):
  """export.hf: the stage's parameters as a Hugging Face directory (<workdir>/<stage>/hf) with
  the run's tokenizer files, for transformers, vLLM or the next experiment's init_from."""
  if not run_.cfg.export.hf:
    return
  path = os.path.join(run_.stage_dir(stage), "hf")
  if parallel.broadcast_object(os.path.isfile(os.path.join(path, "config.json"))):
    return
  tok_dir = _local(run_.cfg, tokenizer_path(run_.cfg)) if run_.cfg.tokenizer.kind == "hf" else None
  if parallel.is_primary():
    hf.export(path, run_.model_cfg, params, tokenizer_dir=tok_dir)
    results_lib.say(f"{stage}: Hugging Face export in {path}")


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def plan(cfg, workdir) -> str:
  """Validates everything that can be checked without training and returns the plan, with the
  per-device memory of each stage (memory.py) on plan.tpu's slice or on this machine's devices."""
  from opsd_jax import memory
  lines = [f"experiment {cfg.name}: stages {' -> '.join(cfg.stages)}; workdir {workdir}"]
  if cfg.init_from and not remote.is_remote(cfg.init_from) and not os.path.isdir(cfg.init_from):
    raise PipelineError(f"init_from: no Hugging Face directory at {cfg.init_from!r}")
  if cfg.data.kind == "toy":
    # The toy's tokenizer is trained at run time: plan with a vocabulary of its usual size.
    model_cfg = model_config(cfg, 512)
  else:
    # The real tokenizer and data: what the run would load, and which rows it would drop.
    train, sets, tok, counts = load_data(cfg, workdir)
    model_cfg = model_config(cfg, tok.vocab_size)
    _check_vocab(model_cfg, tok)
    template = tokenizer_lib.chat_template(tok, cfg.tokenizer.chat_template)
    _, _, reports = fit_rows(cfg, model_cfg, tok, template, train, sets)
    for name, r in reports.items():
      read = counts.get(name, {})
      lines.append(f"data {name}: {read.get('path', '')} layout {read.get('layout', '?')}, "
                   f"{read.get('kept', r.rows)} rows read; {r.line().split(': ', 1)[1]}")
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
    todo = grid.branches(g)  # split_direction runs once per seed
    long = [b for b in todo if b.horizon > 1]
    if "opsd" in cfg.stages:
      branch_plan = "each branch plans as stage opsd above"
    else:
      total = memory.plan_stage(cfg, model_cfg, "opsd", mesh_shape).total
      branch_plan = f"memory per device ~{_gib(total)} GiB" + (
          f", fits {tpu.name}: {memory.fits(total, tpu)}" if tpu else "")
    long_plan = (f" and {len(long)} long-horizon of {cfg.opsd.steps * g.long_horizon_factor} "
                 f"steps (arms {list(g.long_horizon_arms)} x seeds "
                 f"{list(grid.long_horizon_seeds(g))})" if long else "")
    lines.append(f"grid: {len(todo)} OPSD branches from the last stage: {len(todo) - len(long)} "
                 f"of {cfg.opsd.steps} steps (filters {list(g.rollout_filters)} x divergences "
                 f"{list(g.divergences)}, thinking-off arms {list(g.thinking_off_arms)}, x seeds "
                 f"{list(g.seeds)}){long_plan}; " + branch_plan)
  return "\n".join(lines)


def _gib(nbytes) -> str:
  return f"{nbytes / 2 ** 30:.3f}"
