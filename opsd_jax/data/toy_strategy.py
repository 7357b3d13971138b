"""The second toy family: order-of-operations problems whose errors are wrong in kind.

A problem: "Compute 3 + 4 * 5 - 2." Solving it needs a plan: multiplications first, then the
additions and subtractions left to right. The concise reference (the teacher's privileged
context) is that plan's steps, "4 * 5 = 20. 3 + 20 = 23. 23 - 2 = 21." Operands are 1..9, every
problem has at least one multiplication placed so that reading left to right gives another
answer, and every intermediate value of the right plan, the left-to-right plan and the misread
plans stays in 0..40: no minus signs in traces, and small values keep the arithmetic learnable,
so the errors left are mostly the plan's (at 0..99 a 1M-parameter model got 37 % of its answers
wrong by arithmetic alone after SFT). That leaves 9,880 distinct problems.

In the arithmetic family (toy.py) a wrong trace is the right procedure with one slipped digit.
Here the SFT traces contain whole wrong strategies, drawn per trace:

  kind          thinking on (verbose)                             answer   default share
  direct        the right plan, plus 0..max_rechecks re-checks    right    on 0.37 / off 0.45
  dead_end      starts left to right, goes one or two steps past  right    on 0.25 / off -
                where that plan parts from the right one, then
                "Wait, multiplication comes first. Let me start
                over." and the right plan (a dead end abandoned
                late: long, and correct)
  wrong_order   left to right to the end (the dead end never      wrong    on 0.25 / off 0.45
                abandoned)
  misread       the right plan with one quantity of the question  wrong    on 0.13 / off 0.10
                read as another of its numbers ("4 * 2" for
                "4 * 5")

Thinking off (a share of SFT examples, Qwen3's hybrid mode) writes one plan once, with no way
back: no dead ends, no re-checks, so a wrong start is a wrong answer and thinking off is less
accurate than thinking on by construction (62 % right answers in the thinking-on data, 45 %
in the thinking-off data, before the model's own arithmetic slips). The shares are high on
purpose: GRPO removes a wrong plan quickly (it is one decision), and the grid needs an RLVR
checkpoint that still gets a sizeable share of its rollouts wrong, as real models do on hard
math. The choice of plan is one categorical decision at the
first step, which a small model learns as a probability: sampled at T = 1 it repeats the data's
strategy errors, unlike random digit slips, which it smooths away. An incorrect rollout is then
mostly a committed wrong plan, the case where a teacher's token-by-token hindsight has nothing
local to correct.

`python -m opsd_jax.data.toy_stats --family strategy` reports every kind's share (thinking on
and off) in the generated SFT data. The record has the arithmetic family's fields (so the
tokenizer, SFT examples and prompts are shared), plus `trace_kind`, `short_trace_kind`, and the
answers each wrong plan gives (`wrong_order_answer`, `misread_answers`), from which
`classify_error` names the kind of a wrong answer.
"""
from __future__ import annotations

import dataclasses
import random

from opsd_jax.data import toy

OPS = ("+", "-", "*")
ABANDON = "Wait, multiplication comes first. Let me start over:"
KINDS = ("direct", "dead_end", "wrong_order", "misread")


@dataclasses.dataclass(frozen=True)
class StrategyStyle:
  """Shares of each trace kind (see the module doc); the rest is `direct`."""
  dead_end: float = 0.25
  wrong_order: float = 0.25
  misread: float = 0.13
  short_wrong_order: float = 0.45
  short_misread: float = 0.10
  max_rechecks: int = 3
  max_value: int = 40

  def __post_init__(self):
    for on, off in ((self.dead_end + self.wrong_order + self.misread, "thinking on"),
                    (self.short_wrong_order + self.short_misread, "thinking off")):
      if not 0.0 <= on <= 1.0:
        raise ValueError(f"StrategyStyle: the {off} error shares sum to {on}, not in [0, 1]")


def right_plan(nums, ops):
  """Steps [(x, op, y, result)] of the right order: multiplications first, left to right, then
  additions and subtractions left to right."""
  nums, ops, steps = list(nums), list(ops), []
  for wanted in (("*",), ("+", "-")):
    i = 0
    while i < len(ops):
      if ops[i] in wanted:
        result = toy._apply(nums[i], ops[i], nums[i + 1])
        steps.append((nums[i], ops[i], nums[i + 1], result))
        nums[i:i + 2] = [result]
        del ops[i]
      else:
        i += 1
  return steps


def left_to_right(nums, ops):
  steps, value = [], nums[0]
  for op, b in zip(ops, nums[1:]):
    result = toy._apply(value, op, b)
    steps.append((value, op, b, result))
    value = result
  return steps


def _in_range(steps, max_value):
  return all(0 <= c <= max_value for *_, c in steps)


def misreads(nums, ops, max_value):
  """Plans with one operand read as another number of the question: {answer: steps}, only
  those whose answer differs from the right and the left-to-right answers."""
  right, l2r = right_plan(nums, ops)[-1][3], left_to_right(nums, ops)[-1][3]
  out = {}
  for i, j in ((i, j) for i in range(len(nums)) for j in range(len(nums))):
    if i == j or nums[i] == nums[j]:
      continue
    misread_nums = list(nums)
    misread_nums[i] = nums[j]
    steps = right_plan(misread_nums, ops)
    answer = steps[-1][3]
    if _in_range(steps, max_value) and answer not in (right, l2r) and answer not in out:
      out[answer] = steps
  return out


def _draw(rng: random.Random, style: StrategyStyle):
  while True:
    nums = tuple(rng.randint(1, 9) for _ in range(4))
    ops = tuple(rng.choice(OPS) for _ in range(3))
    if "*" not in ops or ops == ("*", "*", "*"):
      continue
    right, l2r = right_plan(nums, ops), left_to_right(nums, ops)
    if (right[-1][3] != l2r[-1][3] and _in_range(right, style.max_value)
        and _in_range(l2r, style.max_value) and misreads(nums, ops, style.max_value)):
      return nums, ops


def question(nums, ops) -> str:
  expr = " ".join([str(nums[0])] + [f"{op} {n}" for op, n in zip(ops, nums[1:])])
  return f"Compute {expr}."


def _text(steps):
  return " ".join(toy._step(*s) for s in steps)


def _with_rechecks(rng, steps, max_rechecks):
  n = rng.randint(0, max_rechecks)
  after = [rng.randrange(len(steps)) for _ in range(n)]
  parts = []
  for i, s in enumerate(steps):
    parts.append(toy._step(*s))
    parts += [f"{rng.choice(toy.RECHECK_PHRASES)} {toy._step(*s)}"] * after.count(i)
  return " ".join(parts), n


def _kind(rng, shares):
  u, edge = rng.random(), 0.0
  for kind, share in shares:
    edge += share
    if u < edge:
      return kind
  return "direct"


def _record(rng: random.Random, nums, ops, style: StrategyStyle):
  right, l2r = right_plan(nums, ops), left_to_right(nums, ops)
  wrong = misreads(nums, ops, style.max_value)
  misread_steps = wrong[rng.choice(sorted(wrong))]
  answer = right[-1][3]

  kind = _kind(rng, (("dead_end", style.dead_end), ("wrong_order", style.wrong_order),
                     ("misread", style.misread)))
  rechecks = 0
  if kind == "wrong_order":
    thought, final = _text(l2r), l2r[-1][3]
  elif kind == "misread":
    thought, final = _text(misread_steps), misread_steps[-1][3]
  else:
    thought, rechecks = _with_rechecks(rng, right, style.max_rechecks)
    final = answer
    if kind == "dead_end":
      parts_at = next(i for i, (a, b) in enumerate(zip(l2r, right)) if a != b)
      went = min(len(l2r) - 1, parts_at + rng.randint(0, 1))
      thought = f"{_text(l2r[:went + 1])} {ABANDON} {thought}"

  short_kind = _kind(rng, (("wrong_order", style.short_wrong_order),
                           ("misread", style.short_misread)))
  short_steps = {"wrong_order": l2r, "misread": misread_steps, "direct": right}[short_kind]
  reference = _text(right)
  return {"question": question(nums, ops), "reference": reference, "answer": str(answer),
          "trace": toy.response(thought, final), "trace_correct": final == answer,
          "trace_kind": kind, "num_rechecks": rechecks,
          "concise_trace": toy.response(reference, answer),
          "short_trace": toy.short_response(_text(short_steps), short_steps[-1][3]),
          "short_trace_correct": short_steps[-1][3] == answer, "short_trace_kind": short_kind,
          "concise_short_trace": toy.short_response(reference, answer),
          "wrong_order_answer": str(l2r[-1][3]),
          "misread_answers": [str(a) for a in sorted(wrong)]}


def make_splits(seed: int, num_train: int, num_test: int,
                style: StrategyStyle = StrategyStyle()) -> tuple[list[dict], list[dict]]:
  """(train, test): problem dicts, disjoint by question, deterministic by seed; the test set is
  drawn first, so it does not depend on num_train."""
  if num_train < 0 or num_test < 0:
    raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")
  problem_rng = random.Random(f"toy-strategy-problems-{seed}")
  trace_rng = random.Random(f"toy-strategy-traces-{seed}")
  keys = toy.distinct_draws(lambda: _draw(problem_rng, style), num_train + num_test,
                            "the strategy toy")
  problems = [_record(trace_rng, nums, ops, style) for nums, ops in keys]
  return problems[num_test:], problems[:num_test]


def classify_error(problem: dict, answer) -> str:
  """The kind of a response's final answer: right, wrong_order, misread, other (an arithmetic
  slip or anything else) or no_answer."""
  if answer is None:
    return "no_answer"
  answer = str(answer).strip()
  if answer == problem["answer"]:
    return "right"
  if answer == problem["wrong_order_answer"]:
    return "wrong_order"
  if answer in problem["misread_answers"]:
    return "misread"
  return "other"
