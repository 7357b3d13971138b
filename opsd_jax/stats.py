"""Two-level (hierarchical) bootstrap over seeds and problems, for the grid's intervals.

An arm's figure (accuracy, mean length) varies with the training seed and with the held-out
problems drawn; a std across seeds shows only the first. Each resample draws the seeds with
replacement and, per benchmark, the problem indices with replacement; the statistic is the mean
over the drawn seeds of each seed's mean over the drawn problems (then the mean over benchmarks,
as the results' summary row). The interval is the percentile one.

The difference to a base is paired: the base (one evaluation of the starting checkpoint) is
resampled with the same problem draw as the arm, since every branch is evaluated on the same
problems. The problem draw depends only on the bootstrap seed and the benchmark sizes, so every
arm of a report sees the same draws.
"""
from __future__ import annotations

import numpy as np

SAMPLES = 2000  # B, resamples
SEED = 0        # fixed: the same data give the same interval
LEVEL = 0.95


def problem_weights(sizes, samples: int = SAMPLES, seed: int = SEED) -> list[np.ndarray]:
  """Per benchmark, [samples, problems]: how often each problem is drawn, divided by the count
  (a row sums to 1, so weights @ values is the mean over the drawn problems)."""
  rng = np.random.default_rng([seed, 0])
  return [rng.multinomial(n, np.full(n, 1.0 / n), size=samples) / n for n in sizes]


def seed_weights(num_seeds: int, samples: int = SAMPLES, seed: int = SEED) -> np.ndarray:
  """[samples, seeds]: the seed draw of each resample, as weights summing to 1."""
  rng = np.random.default_rng([seed, 1])
  return rng.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds), size=samples) / num_seeds


def interval(resamples, level: float = LEVEL) -> tuple[float, float]:
  """The percentile interval of the resampled statistic."""
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(np.asarray(resamples, np.float64), [tail, 100 - tail])
  return float(lo), float(hi)


def _resampled(values_SP, seed_w, problem_w):
  """[samples]: mean over the drawn seeds of each seed's mean over the drawn problems."""
  per_seed = np.asarray(values_SP, np.float64) @ problem_w.T  # [seeds, samples]
  return np.sum(seed_w * per_seed.T, axis=1)


def hierarchical_bootstrap(arm, base=None, samples: int = SAMPLES, seed: int = SEED,
                           level: float = LEVEL) -> dict:
  """An arm's value with its interval and, given a base, the paired difference to it.

  arm: per benchmark, [seeds, problems] per-problem means (e.g. the share of a problem's samples
  that are correct) of each seed's evaluation; base: per benchmark, [problems], or None.
  Returns value / ci (the mean over benchmarks), and with a base diff / diff_ci (arm - base)
  and diff_pct / diff_pct_ci (100 (arm / base - 1)). With one seed the seed level draws that
  seed every time: the interval is then over problems alone.
  """
  arm = [np.atleast_2d(np.asarray(a, np.float64)) for a in arm]
  problem_w = problem_weights([a.shape[1] for a in arm], samples, seed)
  seed_w = seed_weights(arm[0].shape[0], samples, seed)
  stat = np.mean([_resampled(a, seed_w, w) for a, w in zip(arm, problem_w)], axis=0)
  out = dict(value=float(np.mean([a.mean() for a in arm])), ci=interval(stat, level))
  if base is None:
    return out
  base = [np.asarray(b, np.float64) for b in base]
  base_stat = np.mean([b @ w.T for b, w in zip(base, problem_w)], axis=0)
  # The difference resampled from arm - base per problem: exactly 0 where they agree.
  diff = np.mean([_resampled(a - b, seed_w, w) for a, b, w in zip(arm, base, problem_w)], axis=0)
  diff_value = float(np.mean([(a - b).mean() for a, b in zip(arm, base)]))
  base_value = float(np.mean([b.mean() for b in base]))
  with np.errstate(divide="ignore", invalid="ignore"):
    pct = 100 * diff / base_stat
  out.update(diff=diff_value, diff_ci=interval(diff, level),
             diff_pct=100 * diff_value / base_value if base_value else float("nan"),
             diff_pct_ci=interval(pct, level))
  return out
