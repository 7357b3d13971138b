"""`python -m opsd_jax.data.toy_stats --seed 0 --n 10000 [--family strategy]`: the toy generator's
statistics as JSON.

Lengths in tokens use the toy tokenizer trained on the generated problems (as the pipeline
does) and count the completion with its EOS; characters count the completion text. The
arithmetic family reports its digit slips; the strategy family the share of each kind of trace
(direct, dead end abandoned, wrong order, misread quantity) with thinking on and off, and the
share of right final answers in each mode.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from opsd_jax.data import toy, toy_strategy


def _summary(values):
  v = np.asarray(values, np.float64)
  return {"mean": round(float(v.mean()), 2), "median": float(np.median(v)),
          "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def stats(problems, tok) -> dict:
  trace_tokens = [len(tok.encode(p["trace"])) + 1 for p in problems]
  concise_tokens = [len(tok.encode(p["concise_trace"])) + 1 for p in problems]
  rechecks = [p["num_rechecks"] for p in problems]
  n = len(problems)
  return {
      "problems": n,
      "trace_tokens": _summary(trace_tokens),
      "trace_chars": _summary([len(p["trace"]) for p in problems]),
      "concise_tokens": _summary(concise_tokens),
      "concise_chars": _summary([len(p["concise_trace"]) for p in problems]),
      "verbose_over_concise_tokens": round(float(np.mean(trace_tokens) / np.mean(concise_tokens)),
                                           3),
      "rechecks_per_trace": {"mean": round(float(np.mean(rechecks)), 3),
                             "histogram": {str(k): rechecks.count(k)
                                           for k in range(max(rechecks) + 1)}},
      **(_strategy_errors(problems) if "trace_kind" in problems[0] else _slips(problems)),
      "wrong_final_answer_rate": round(sum(not p["trace_correct"] for p in problems) / n, 4),
      "tokenizer_vocab_size": tok.vocab_size,
  }


def _share(values, value):
  return round(sum(v == value for v in values) / len(values), 4)


def _slips(problems):
  slips = [p["slip"] for p in problems]
  return {"slip_rate": round(1 - _share(slips, "none"), 4),
          "slip_caught_rate": _share(slips, "caught")}


def _strategy_errors(problems):
  on = [p["trace_kind"] for p in problems]
  off = [p["short_trace_kind"] for p in problems]
  return {"trace_kinds_thinking_on": {k: _share(on, k) for k in toy_strategy.KINDS},
          "trace_kinds_thinking_off": {k: _share(off, k) for k in toy_strategy.KINDS},
          "right_answer_thinking_on": _share([p["trace_correct"] for p in problems], True),
          "right_answer_thinking_off": _share([p["short_trace_correct"] for p in problems],
                                              True)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--n", type=int, default=10000, help="number of problems")
  parser.add_argument("--family", default="arithmetic", choices=("arithmetic", "strategy"))
  parser.add_argument("--difficulty", type=int, default=1, choices=sorted(toy.DIFFICULTIES),
                      help="arithmetic family only")
  parser.add_argument("--vocab_size", type=int, default=256)
  args = parser.parse_args(argv)
  if args.family == "strategy":
    problems, _ = toy_strategy.make_splits(args.seed, args.n, 0)
  else:
    problems, _ = toy.make_splits(args.seed, args.n, 0, args.difficulty)
  with tempfile.TemporaryDirectory() as workdir:
    tok = toy.build_tokenizer(problems, workdir, args.vocab_size)
    result = {"seed": args.seed, "family": args.family, **stats(problems, tok)}
    if args.family == "arithmetic":
      result["difficulty"] = args.difficulty
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
