"""The paper's grid on the toy task: SFT -> RLVR once, then OPSD branches from that RLVR
checkpoint for every rollout filter (all, correct_only, incorrect_only) x divergence arm (rkl:
reverse KL over the full vocabulary; fkl: forward KL, unclipped; fkl_tau: forward KL with each
pointwise summand clipped at grid.tau = 0.05, Paper A's recipe; rkl_sampled: the single-sample
reverse KL at the student's own tokens), split_direction once (it uses rkl on correct and fkl on
incorrect rollouts whatever the divergence, so it is one arm, labelled rkl+fkl), and a
short-trace arm: thinking-off student, thinking-on teacher, all rollouts, forward KL (Paper A's
set-up), evaluated with thinking off against the RLVR checkpoint evaluated with thinking off.
5 seeds each (0-4). Plus a long-horizon arm: correct_only / rkl for 5x the OPSD steps on seeds
0-2, to see whether compaction keeps going or accuracy erodes past the usual horizon.

grid.md reports each arm's accuracy and mean length with 95 % intervals of a two-level bootstrap
over seeds and problems, the paired difference to the base, and whether Paper A's / Paper B's
direction reproduces; the base rows hold SFT and RLVR with thinking on and off. grid.png plots
accuracy against length with the intervals, grid_long_horizon.png the long arm's rollouts.

SFT differs from the embedded default in one knob: 30 % of its examples are thinking-off (short
trace), so the model has a thinking-off mode to distil, like Qwen3's hybrid thinking. RLVR and the
base evaluation stay thinking-on.
"""
from experiments import toy_compaction


def get_config():
  c = toy_compaction.get_config()
  c.name = "toy_paper_grid"
  c.stages = ("sft", "rlvr")
  c.sft.thinking_off_share = 0.3
  c.grid.rollout_filters = ("all", "correct_only", "incorrect_only", "split_direction")
  c.grid.divergences = ("rkl", "fkl", "fkl_tau", "rkl_sampled")
  c.grid.tau = 0.05
  c.grid.seeds = (0, 1, 2, 3, 4)
  c.grid.thinking_off_arms = ("all/fkl",)
  c.grid.long_horizon_arms = ("correct_only/rkl",)
  c.grid.long_horizon_factor = 5
  c.grid.long_horizon_seeds = (0, 1, 2)
  return c
