"""Grader throughput: 1,000 checks per batch through `grader.Grader`, with the peer side by side.

Batches (each 1,000 responses, golds alongside):
  toy_integers   "<think>..</think> \\boxed{N}" vs integer golds: the parent's exact fast path
  latex          \\frac / \\sqrt / sets / intervals / x=..: every check goes to math-verify workers
  adversarial    the latex batch with 2 % hostile answers (power towers, 10^6-char strings, deep
                 braces, code): each hostile check is cut at the hard limit
The peer: plain `math_verify.parse` + `verify` called in-process (one thread, its SIGALRM
timeouts), as a reward function in other frameworks calls it, on the same latex batch.

  python bench/verify.py [--workers 2] [--timeout 5] [--n 1000]

JSON lines: {"bench": "verify", "batch": ..., "seconds": ..., "checks_per_s": ..., counts...}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opsd_jax import grader as grader_lib  # noqa: E402


def emit(**fields):
  print(json.dumps(fields), flush=True)


def latex_batch(n, rng):
  texts, golds = [], []
  for i in range(n):
    a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    answer, gold = [
        (f"\\frac{{{2 * a}}}{{{2 * b}}}", f"{a}/{b}"),
        (f"\\sqrt{{{a * a * 2}}}", f"{a}\\sqrt{{2}}"),
        (f"\\{{{a}, {b}\\}}", f"\\{{{b}, {a}\\}}"),
        (f"[{a}, {a + b})", f"[{a},{a + b})"),
        (f"x={a}", f"{a}"),
        (f"{a}\\%", f"{a / 100}"),
        (f"{a}\\pi", f"{a}\\pi"),
    ][i % 7]
    if rng.random() < 0.3:
      answer = f"{answer}+1"  # make some wrong
    texts.append(f"<think>Some reasoning. Wait, let me double-check.</think> \\boxed{{{answer}}}")
    golds.append(gold)
  return texts, golds


def hostile(i):
  return [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2^{2^{40}}}", "x" * 10**6,
          r"\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",
          r"\boxed{__import__('os').system('true')}"][i % 5]


def timed(grader, texts, golds):
  start = time.perf_counter()
  result = grader.grade(texts, golds)
  return time.perf_counter() - start, result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=5.0)
  parser.add_argument("--n", type=int, default=1000)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  n = args.n

  with grader_lib.Grader(num_workers=args.workers, timeout_s=args.timeout) as grader:
    start = time.perf_counter()
    grader.grade([r"\boxed{\sqrt{4}}"], ["2"])
    emit(bench="verify", batch="pool_start", seconds=round(time.perf_counter() - start, 3),
         workers=args.workers)

    toy_golds = [str(int(x)) for x in rng.integers(0, 1000, n)]
    toy_texts = [f"<think>...</think> \\boxed{{{g if rng.random() < 0.6 else int(g) + 1}}}"
                 for g in toy_golds]
    seconds, result = timed(grader, toy_texts, toy_golds)
    emit(bench="verify", batch="toy_integers", n=n, seconds=round(seconds, 4),
         checks_per_s=round(n / seconds), **result.counts)

    texts, golds = latex_batch(n, rng)
    seconds, result = timed(grader, texts, golds)
    latex_correct = result.correct
    emit(bench="verify", batch="latex", n=n, seconds=round(seconds, 3),
         checks_per_s=round(n / seconds, 1), workers=args.workers, **result.counts)

    hostile_every = 50
    adv_texts = [hostile(i // hostile_every) if i % hostile_every == 0 else t
                 for i, t in enumerate(texts)]
    seconds, result = timed(grader, adv_texts, golds)
    emit(bench="verify", batch="adversarial", n=n, hostile=n // hostile_every,
         seconds=round(seconds, 3), timeout_s=args.timeout,
         workers_replaced=grader.workers_replaced, **result.counts)

  # The peer: math-verify in-process on the same latex batch (no hostile input: in-process it has
  # no hard limit, so a power tower could hang it).
  import math_verify
  logging.disable(logging.WARNING)
  start = time.perf_counter()
  peer = []
  for text, gold in zip(texts, golds):
    parsed_gold = math_verify.parse("\\boxed{" + gold + "}")
    parsed_answer = math_verify.parse(text)
    peer.append(bool(parsed_gold and parsed_answer and math_verify.verify(parsed_gold,
                                                                           parsed_answer)))
  seconds = time.perf_counter() - start
  emit(bench="verify", batch="latex_peer_in_process", n=n, seconds=round(seconds, 3),
       checks_per_s=round(n / seconds, 1),
       agreement_with_grader=float(np.mean(np.array(peer) == latex_correct)))


if __name__ == "__main__":
  main()
