"""The embedded default's task: multi-step arithmetic a 1-5M-parameter model learns on a CPU.

A problem: "Start with 17. Add 25. Subtract 8. What is the result?" Its concise reference (the
teacher's privileged context) is the steps only, "17 + 25 = 42. 42 - 8 = 34." The SFT trace is
deliberately verbose, like a reasoning model after RL: inside `<think> ... </think>` every step,
plus a random number (0..max_rechecks) of redundant re-verification segments ("Wait, let me
double-check: 17 + 25 = 42."), and a share of traces with a slip (a step off by 1 or 10), some
caught and fixed ("..., not 43."), some not, ending in a wrong answer. Then
"The answer is \\boxed{34}." Numbers stay small and digits are single tokens, so traces stay
well under ~150 tokens.

SFT mixes two kinds of examples: student prompt -> verbose trace, and (a `concise_share` of them)
teacher prompt with the reference -> the concise trace, so the model learns that with the
reference in view it writes concisely; OPSD then distils that into the student.

Thinking off (a `thinking_off_share` of the SFT examples; Qwen3's hybrid mode): the prompt ends
with an empty thought and the completion is the short trace, the steps written once with no
re-checks, then the answer: "17 + 25 = 42. 42 - 8 = 34. The answer is \\boxed{34}." Not the
answer alone: Qwen3's non-thinking answers still show a brief worked solution, and a model this
small cannot do three steps of arithmetic without writing them, so answer-only would make the
thinking-off mode a guessing mode instead of a short-output mode. With no re-checking, a slip in
the trace is never caught (the short trace carries it to a wrong answer), so thinking off is
shorter and less accurate than thinking on -- the regime where Paper A says hindsight supervision
can name better tokens.

Everything is deterministic by seed; the test problems are drawn first from the stream of
unique questions, so the test set does not depend on num_train, and the splits never share a
question.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random

from opsd_jax import prompts
from opsd_jax import tokenizer as tokenizer_lib

RECHECK_PHRASES = ("Wait, let me double-check:", "Hmm, let me verify:", "Let me check that again:")
_WORDS = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}."}


@dataclasses.dataclass(frozen=True)
class Difficulty:
  num_ops: int          # operations after the starting number
  max_operand: int      # operands and the start are 1..max_operand (multipliers 2..9)
  ops: tuple[str, ...]
  max_value: int        # every intermediate result stays in 0..max_value


DIFFICULTIES = {
    # 0: single-digit operands, so the ~500 step facts (a +- b, a <= 30) are learnt in minutes.
    0: Difficulty(num_ops=3, max_operand=9, ops=("+", "-"), max_value=30),
    1: Difficulty(num_ops=2, max_operand=50, ops=("+", "-"), max_value=199),
    2: Difficulty(num_ops=3, max_operand=99, ops=("+", "-"), max_value=299),
    3: Difficulty(num_ops=3, max_operand=99, ops=("+", "-", "*"), max_value=999),
}


@dataclasses.dataclass(frozen=True)
class TraceStyle:
  max_rechecks: int = 4      # redundant re-check segments per trace: uniform on 0..max_rechecks
  slip_rate: float = 0.15    # share of traces with one wrong step
  catch_rate: float = 0.5    # share of slips caught and fixed right away


def _apply(a, op, b):
  return a + b if op == "+" else a - b if op == "-" else a * b


def _step(a, op, b, c):
  return f"{a} {op} {b} = {c}."


def _draw_problem(rng: random.Random, d: Difficulty):
  start = rng.randint(1, d.max_operand)
  value, ops = start, []
  for _ in range(d.num_ops):
    while True:
      op = rng.choice(d.ops)
      b = rng.randint(2, 9) if op == "*" else rng.randint(1, d.max_operand)
      result = _apply(value, op, b)
      if 0 <= result <= d.max_value:
        break
    ops.append((op, b))
    value = result
  return start, tuple(ops)


def _question(start, ops):
  return " ".join([f"Start with {start}."] + [_WORDS[op].format(b) for op, b in ops]
                  + ["What is the result?"])


def _solve(start, ops):
  steps, value = [], start
  for op, b in ops:
    c = _apply(value, op, b)
    steps.append((value, op, b, c))
    value = c
  return steps, value


def _slipped(rng, true_value, later_ops):
  """A wrong value off by 1 or 10 from which the remaining steps stay non-negative (no minus
  signs in traces); true_value + 1 always qualifies."""
  def stays_non_negative(value):
    for op, b in later_ops:
      value = _apply(value, op, b)
      if value < 0:
        return False
    return True
  options = [true_value + d for d in (1, -1, 10, -10)
             if true_value + d >= 0 and stays_non_negative(true_value + d)]
  return rng.choice(options)


def _trace(rng: random.Random, start, ops, style: TraceStyle):
  """The verbose trace text, (final value, num_rechecks, slip kind) and the short (thinking-off)
  trace text with its final value. The short trace reuses the verbose trace's draws (same slip,
  left uncaught), so it draws nothing more from `rng` and the verbose data stay as they were."""
  n = len(ops)
  num_rechecks = rng.randint(0, style.max_rechecks)
  rechecks_after = [rng.randrange(n) for _ in range(num_rechecks)]
  slip_at = rng.randrange(n) if rng.random() < style.slip_rate else None
  caught = slip_at is not None and rng.random() < style.catch_rate
  parts, value = [], start
  for i, (op, b) in enumerate(ops):
    true = _apply(value, op, b)
    written = _slipped(rng, true, ops[i + 1:]) if i == slip_at else true
    if i == slip_at:
      slipped_value = written
    parts.append(_step(value, op, b, written))
    if i == slip_at and caught:
      parts.append(f"{rng.choice(RECHECK_PHRASES)} {value} {op} {b} = {true}, not {written}.")
      written = true
    for _ in range(rechecks_after.count(i)):
      parts.append(f"{rng.choice(RECHECK_PHRASES)} {_step(value, op, b, written)}")
    value = written
  slip = "none" if slip_at is None else "caught" if caught else "uncaught"
  short_parts, short_value = [], start
  for i, (op, b) in enumerate(ops):
    c = slipped_value if i == slip_at else _apply(short_value, op, b)
    short_parts.append(_step(short_value, op, b, c))
    short_value = c
  short = short_response(" ".join(short_parts), short_value)
  return response(" ".join(parts), value), value, num_rechecks, slip, short, short_value


def response(thought: str, answer) -> str:
  """The response form every toy completion has (the completion text before EOS)."""
  return (f"{tokenizer_lib.THINK_OPEN} {thought} {tokenizer_lib.THINK_CLOSE} "
          f"The answer is \\boxed{{{answer}}}.")


def short_response(steps: str, answer) -> str:
  """A thinking-off completion: the steps outside any thought, then the answer (the prompt
  already ends with the empty thought)."""
  return f"{steps} The answer is \\boxed{{{answer}}}."


def make_problem(rng: random.Random, difficulty: int = 1, style: TraceStyle = TraceStyle()):
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"toy difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
  start, ops = _draw_problem(rng, DIFFICULTIES[difficulty])
  return _record(rng, start, ops, style)


def _record(rng, start, ops, style):
  steps, answer = _solve(start, ops)
  reference = " ".join(_step(*s) for s in steps)
  trace, final, num_rechecks, slip, short, short_final = _trace(rng, start, ops, style)
  return {"question": _question(start, ops), "reference": reference, "answer": str(answer),
          "trace": trace, "trace_correct": final == answer, "num_rechecks": num_rechecks,
          "slip": slip, "concise_trace": response(reference, answer),
          "short_trace": short, "short_trace_correct": short_final == answer,
          "concise_short_trace": short_response(reference, answer)}


def make_splits(seed: int, num_train: int, num_test: int, difficulty: int = 1,
                style: TraceStyle = TraceStyle()) -> tuple[list[dict], list[dict]]:
  """(train, test): lists of problem dicts, disjoint by question, deterministic by seed."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"toy difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
  if num_train < 0 or num_test < 0:
    raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")
  d = DIFFICULTIES[difficulty]
  problem_rng = random.Random(f"toy-problems-{seed}-{difficulty}")
  trace_rng = random.Random(f"toy-traces-{seed}-{difficulty}")
  keys = distinct_draws(lambda: _draw_problem(problem_rng, d), num_train + num_test,
                        f"toy difficulty {difficulty}")
  problems = [_record(trace_rng, start, ops, style) for start, ops in keys]
  return problems[num_test:], problems[:num_test]


def distinct_draws(draw, wanted: int, what: str) -> list:
  """`wanted` distinct results of `draw()` (hashable), in the order first drawn; a family with
  too few distinct problems is an error, not an endless loop."""
  seen, out = set(), []
  for _ in range(20 * wanted + 1000):
    if len(out) == wanted:
      return out
    key = draw()
    if key not in seen:
      seen.add(key)
      out.append(key)
  if len(out) == wanted:
    return out
  raise ValueError(f"{what} has too few distinct problems for {wanted} (found {len(out)})")


def corpus(problems) -> list[str]:
  """Text the toy tokenizer is trained on: everything a prompt or completion may contain."""
  texts = list(prompts.instruction_texts())
  for p in problems:
    texts += [p["question"], p["reference"], p["trace"], p["concise_trace"]]
  texts += [" ".join(tokenizer_lib.PLAIN_MARKERS)]
  return texts


def build_tokenizer(problems, workdir: str, vocab_size: int = 256) -> tokenizer_lib.Tokenizer:
  """A sentencepiece model trained on the problems' text (digits split, the plain template's
  markers as single pieces), cached in `workdir` under a name keyed by the corpus and size."""
  texts = corpus(problems)
  digest = hashlib.sha1(("\n".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:12]
  prefix = os.path.join(workdir, f"toy_tokenizer_{digest}")
  if os.path.isfile(prefix + ".model"):
    return tokenizer_lib.load("sentencepiece", prefix + ".model")
  return tokenizer_lib.train_sentencepiece(texts, vocab_size, prefix)


def sft_examples(problems, tok, template, concise_share: float = 0.3, seed: int = 0,
                 thinking_off_share: float = 0.0) -> list[tuple[list[int], list[int]]]:
  """(prompt_ids, completion_ids) per problem: a `concise_share` of them teacher prompt (full
  reference) -> concise trace, the rest student prompt -> verbose trace; a `thinking_off_share`
  of either kind rendered with thinking off instead (the prompt closes an empty thought, the
  completion is the short trace: see the module doc). EOS ends each completion. The thinking
  draws come from their own stream, so a share of 0 gives the same examples as before it
  existed."""
  for name, share in (("concise_share", concise_share), ("thinking_off_share", thinking_off_share)):
    if not 0.0 <= share <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {share}")
  rng = random.Random(f"toy-sft-{seed}")
  thinking_rng = random.Random(f"toy-sft-thinking-{seed}")
  eos = tok.eos_ids[0]
  examples = []
  for p in problems:
    concise = rng.random() < concise_share
    thinking = not (thinking_off_share and thinking_rng.random() < thinking_off_share)
    if concise:
      prompt = prompts.teacher(tok, template, p["question"], p["reference"], "full",
                               thinking=thinking)
      completion = p["concise_trace"] if thinking else p["concise_short_trace"]
    else:
      prompt = prompts.student(tok, template, p["question"], thinking=thinking)
      completion = p["trace"] if thinking else p["short_trace"]
    examples.append((prompt, tok.encode(completion) + [eos]))
  return examples
