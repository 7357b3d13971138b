"""The paper's grid on the strategy toy family (opsd_jax/data/toy_strategy.py): the same arms,
seeds and long-horizon arm as experiments/toy_paper_grid.py, on problems whose wrong rollouts
are wrong plans (left to right instead of multiplication first, a misread quantity) rather than
slipped digits, and whose thinking-off mode is clearly less accurate than thinking on. This is
the toy in which Paper B's second finding (OPSD on incorrect rollouts hurts) and Paper A's
premise (hindsight helps a short-output student) can show, or fail to show.

The family has 9,880 distinct problems (values kept in 0..40), so 8,000 train and 500 test;
SFT runs 1,500 steps (its facts include products, so it needs longer than the arithmetic
family's 1,000). RLVR runs 12 steps at lr 1e-4, so the base still gets a sizeable share of its
rollouts wrong (the grid needs incorrect rollouts to train on, and real models after RL still
fail ~30 % of hard math): measured on an earlier version of this family, GRPO at the default 60
steps / 2e-4 took rollout accuracy from 0.78 to ~0.93 within 15 steps, since a wrong plan here
is one decision. The thinking-off arms are all/fkl (Paper A's divergence) and all/rkl: forward KL
collapsed the thinking-on arms of both families at this learning rate, so the rkl arm tests
Paper A's premise (a thinking-on teacher makes a short-output student more accurate) apart from
the divergence. Everything else is toy_paper_grid's.
"""
from experiments import toy_paper_grid


def get_config():
  c = toy_paper_grid.get_config()
  c.name = "toy_strategy_grid"
  c.data.family = "strategy"
  c.data.num_train = 8_000
  c.sft.steps = 1_500
  c.rlvr.update(dict(steps=12, learning_rate=1e-4))
  c.grid.thinking_off_arms = ("all/fkl", "all/rkl")
  return c
