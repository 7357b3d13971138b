"""`python -m opsd_jax.data.toy_stats --seed 0 --n 10000`: the toy generator's statistics as JSON.

Lengths in tokens use the toy tokenizer trained on the generated problems (as the pipeline
does) and count the completion with its EOS; characters count the completion text.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from opsd_jax.data import toy


def _summary(values):
  v = np.asarray(values, np.float64)
  return {"mean": round(float(v.mean()), 2), "median": float(np.median(v)),
          "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def stats(problems, tok) -> dict:
  trace_tokens = [len(tok.encode(p["trace"])) + 1 for p in problems]
  concise_tokens = [len(tok.encode(p["concise_trace"])) + 1 for p in problems]
  rechecks = [p["num_rechecks"] for p in problems]
  slips = [p["slip"] for p in problems]
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
      "slip_rate": round(sum(s != "none" for s in slips) / n, 4),
      "slip_caught_rate": round(slips.count("caught") / n, 4),
      "wrong_final_answer_rate": round(sum(not p["trace_correct"] for p in problems) / n, 4),
      "tokenizer_vocab_size": tok.vocab_size,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--n", type=int, default=10000, help="number of problems")
  parser.add_argument("--difficulty", type=int, default=1, choices=sorted(toy.DIFFICULTIES))
  parser.add_argument("--vocab_size", type=int, default=256)
  args = parser.parse_args(argv)
  problems, _ = toy.make_splits(args.seed, args.n, 0, args.difficulty)
  with tempfile.TemporaryDirectory() as workdir:
    tok = toy.build_tokenizer(problems, workdir, args.vocab_size)
    result = {"seed": args.seed, "difficulty": args.difficulty, **stats(problems, tok)}
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
