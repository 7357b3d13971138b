"""The paper's grid on the toy task: SFT -> RLVR once, then OPSD branches from that RLVR
checkpoint for every rollout filter (all, correct_only, incorrect_only) x divergence (fkl, rkl),
split_direction once (it uses rkl on correct and fkl on incorrect rollouts whatever the
divergence, so it is one arm, labelled rkl+fkl), and a short-trace arm: thinking-off student,
thinking-on teacher, all rollouts, forward KL (Paper A's recipe), evaluated with thinking off
against the RLVR checkpoint evaluated with thinking off. 3 seeds each; grid.md reports mean ± std
across seeds and grid.png plots accuracy against response length.

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
  c.grid.divergences = ("fkl", "rkl")
  c.grid.seeds = (0, 1, 2)
  c.grid.thinking_off_arms = ("all/fkl",)
  return c
