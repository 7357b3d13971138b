"""The paper's grid on the toy task: SFT -> RLVR once, then OPSD branches from that RLVR
checkpoint for every rollout filter (all, correct_only, incorrect_only, split_direction) x
divergence (fkl, rkl) x 3 seeds; grid.md reports mean ± std across seeds and grid.png plots
accuracy against response length. (split_direction uses rkl on correct and fkl on incorrect
rollouts whatever the divergence, so its two arms differ only by seed streams.)
"""
from experiments import toy_compaction


def get_config():
  c = toy_compaction.get_config()
  c.name = "toy_paper_grid"
  c.stages = ("sft", "rlvr")
  c.grid.rollout_filters = ("all", "correct_only", "incorrect_only", "split_direction")
  c.grid.divergences = ("fkl", "rkl")
  c.grid.seeds = (0, 1, 2)
  return c
