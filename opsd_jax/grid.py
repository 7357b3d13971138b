"""The paper's grid: OPSD branches from one checkpoint, one per (rollout filter, divergence arm,
student thinking mode, horizon, seed), each evaluated like a stage (grid_report.py reports them
with 95 % intervals over seeds and problems and, per arm, whether the papers' claim reproduces).

Arms: every grid.rollout_filters x grid.divergences, where a divergence entry names an arm of
ARMS (the opsd settings it sets), except split_direction, which runs once per seed (it uses rkl
on correct and fkl on incorrect rollouts whatever opsd.divergence says, so one run per
divergence would repeat the same computation; it is labelled "rkl+fkl"). Then each
grid.thinking_off_arms entry ("rollout_filter/arm"): a thinking-off student with a thinking-on
teacher (Paper A), evaluated with thinking off and compared with the base checkpoint evaluated
with thinking off (results["grid_base_thinking_off"]). Branches run seed-major, so an unfinished
grid already holds every arm at its first seeds. Last, each grid.long_horizon_arms entry runs
opsd.steps x grid.long_horizon_factor steps on grid.long_horizon_seeds ("long5x-" branches);
its rollout trajectory is plotted against the 1x step count.

Each branch lives in <workdir>/grid/<name>/ with its own checkpoints and metrics.jsonl, so it
resumes on its own; a finished branch is recorded in results.json["grid"] and skipped on rerun.
The report (grid.md, grid_summary.json, the plots) is grid_report.py's.
"""
from __future__ import annotations

import dataclasses
import os

from opsd_jax import benchmarks, metrics
from opsd_jax import results as results_lib
from opsd_jax.train import opsd

SPLIT_LABEL = "rkl+fkl"  # split_direction: reverse KL on correct, forward KL on incorrect rollouts
TAU = "grid.tau"  # in ARMS: replaced by the grid's tau
# Divergence arm (a grid.divergences entry) -> the opsd settings it sets.
ARMS = {
    "rkl": dict(divergence="rkl", estimator="full"),              # reverse KL, full vocabulary
    "fkl": dict(divergence="fkl", estimator="full"),              # forward KL, opsd.clip as set
    "fkl_tau": dict(divergence="fkl", estimator="full", clip=TAU),  # each summand clipped at tau
    # the single-sample reverse KL: -A log p_S(y), A = stopgrad(log p_T(y) - log p_S(y))
    "rkl_sampled": dict(divergence="rkl", estimator="sampled", clip=-1.0),
}
# split_direction picks the direction per row itself; it runs with this arm's estimator.
SPLIT_ARM = "rkl"
LONG_CHECKPOINTS = 5  # a long-horizon branch saves at most about this many checkpoints


@dataclasses.dataclass(frozen=True)
class Branch:
  rollout_filter: str
  divergence: str        # the arm's name in ARMS
  seed: int
  thinking: bool = True  # the student's thinking mode (the teacher's is always on)
  horizon: int = 1       # opsd.steps x horizon steps

  @property
  def divergence_label(self) -> str:
    return SPLIT_LABEL if self.rollout_filter == "split_direction" else self.divergence

  @property
  def arm(self) -> str:
    return arm_name(self.rollout_filter, self.divergence_label, self.thinking, self.horizon)

  @property
  def name(self) -> str:
    prefix = ("" if self.thinking else "thinking_off-") + (
        f"long{self.horizon}x-" if self.horizon > 1 else "")
    return f"{prefix}{self.rollout_filter}-{self.divergence_label}-seed{self.seed}"


def arm_name(rollout_filter, divergence_label, thinking=True, horizon=1) -> str:
  return (f"{rollout_filter} / {divergence_label}" + ("" if thinking else " / thinking off")
          + (f" / {horizon}x steps" if horizon > 1 else ""))


def parse_arm(entry: str) -> tuple[str, str]:
  """'rollout_filter/arm' (thinking_off_arms, long_horizon_arms) -> (filter, arm)."""
  rollout_filter, _, divergence = str(entry).partition("/")
  return rollout_filter, divergence


def long_horizon_seeds(grid_cfg) -> tuple:
  return tuple(grid_cfg.long_horizon_seeds) or tuple(grid_cfg.seeds)


def branches(grid_cfg) -> list[Branch]:
  """Every branch of the grid, seed-major; split_direction once per seed; long-horizon last."""
  out = []
  for seed in grid_cfg.seeds:
    for rollout_filter in grid_cfg.rollout_filters:
      arms = (SPLIT_ARM,) if rollout_filter == "split_direction" else grid_cfg.divergences
      out += [Branch(rollout_filter, d, seed) for d in arms]
    out += [Branch(*parse_arm(a), seed, thinking=False) for a in grid_cfg.thinking_off_arms]
  for seed in long_horizon_seeds(grid_cfg):
    out += [Branch(*parse_arm(a), seed, horizon=grid_cfg.long_horizon_factor)
            for a in grid_cfg.long_horizon_arms]
  return out


def arm_overrides(divergence: str, tau: float) -> dict:
  return {k: float(tau) if v == TAU else v for k, v in ARMS[divergence].items()}


def _branch_config(cfg, b: Branch):
  branch = cfg.copy_and_resolve_references()
  branch.unlock()
  arm = SPLIT_ARM if b.rollout_filter == "split_direction" else b.divergence
  branch.opsd.update(arm_overrides(arm, cfg.grid.tau))
  branch.opsd.rollout_filter = b.rollout_filter
  branch.opsd.student_thinking = b.thinking
  if not b.thinking:
    branch.opsd.teacher_thinking = True
  if b.horizon > 1:
    branch.opsd.steps = cfg.opsd.steps * b.horizon
    branch.opsd.checkpoint_every = -(-branch.opsd.steps // LONG_CHECKPOINTS)
  branch.seed = cfg.seed + b.seed
  return branch


def base_stage(cfg) -> str:
  """The results key of the checkpoint the branches start from: the last stage's output."""
  trained = [s for s in cfg.stages if s != "eval"]
  return trained[-1] if trained else "init"


def _evaluate_once(run_, params, results, key, label):
  """A thinking-off evaluation kept in results[key]: made once, resumable like a stage's."""
  if key in results:
    return
  results[key] = benchmarks.evaluate_params(run_, params, label, thinking=False)
  results_lib.save(run_.workdir, results)
  results_lib.print_eval(label, results[key])


def after_stage(run_, stage, params, results):
  """SFT's output evaluated with thinking off too while its parameters are in memory (the
  check that thinking off is clearly less accurate than thinking on after SFT), when the grid
  has thinking-off arms and SFT is not its base (whose thinking-off row the grid makes)."""
  g = run_.cfg.grid
  if stage == "sft" and g.rollout_filters and g.thinking_off_arms \
      and base_stage(run_.cfg) != "sft":
    _evaluate_once(run_, params, results, "grid_sft_thinking_off", "sft (thinking off)")


def run(run_, base_params, results):
  done = results.setdefault("grid", {})
  todo = branches(run_.cfg.grid)
  if any(not b.thinking for b in todo):
    _evaluate_once(run_, base_params, results, "grid_base_thinking_off", "base (thinking off)")
  for b in todo:
    if b.name in done:
      continue
    workdir = os.path.join(run_.workdir, "grid", b.name)
    logger = metrics.Logger(workdir)
    branch = dataclasses.replace(run_, cfg=_branch_config(run_.cfg, b), workdir=workdir,
                                 logger=logger)
    try:
      params = opsd.train(branch, base_params)
      r = benchmarks.evaluate_params(branch, params, b.name, thinking=b.thinking)
      r.update(rollout_filter=b.rollout_filter, divergence=b.divergence_label, seed=b.seed,
               thinking=b.thinking, horizon=b.horizon, opsd_steps=branch.cfg.opsd.steps,
               base=base_stage(run_.cfg),
               trained_tokens=int(sum(x.get("opsd/trained_tokens", 0)
                                      for x in logger.records("opsd"))))
    finally:
      logger.close()
    done[b.name] = r
    results_lib.save(run_.workdir, results)
    results_lib.say(f"[grid {b.name}] accuracy={r['accuracy']:.3f} "
                    f"mean_length={r['mean_length']:.1f} trained_tokens={r['trained_tokens']}")
