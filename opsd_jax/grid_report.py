"""The grid's report: every arm of the OPSD grid (grid.py) with 95 % intervals over seeds and
problems, its paired difference to the base, and whether the papers' claim reproduces.

Writes grid.md (the table), grid_summary.json (its numbers), grid.png (accuracy against response
length, error bars = the intervals) and, with long-horizon arms, grid_long_horizon.png.
`python -m opsd_jax.grid_report WORKDIR` rewrites them from WORKDIR/results.json and the
evaluations' sample files (e.g. while the grid is still running, from the branches finished so
far).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import numpy as np

from opsd_jax import benchmarks, evaluate, metrics, stats
from opsd_jax import results as results_lib
from opsd_jax.grid import arm_name


@dataclasses.dataclass(frozen=True)
class Claim:
  paper: str
  claim: str
  # (row key, "<" or ">", threshold): the row's interval must lie entirely on that side.
  tests: tuple[tuple[str, str, float], ...]


# The papers' claims the grid tests; an arm's claim: its student thinking off -> "thinking_off",
# else its rollout filter. Other arms test no claim.
CLAIMS = {
    "correct_only": Claim("Paper B (Kim & Lee)", "correct-only OPSD: shorter, no accuracy loss "
                          "beyond 2 points", (("length_diff_pct", "<", 0.0),
                                              ("accuracy_diff_points", ">", -2.0))),
    "incorrect_only": Claim("Paper B (Kim & Lee)", "incorrect-only OPSD: less accurate",
                            (("accuracy_diff_points", "<", 0.0),)),
    "thinking_off": Claim("Paper A (Zhao et al.)", "thinking-off student, thinking-on teacher: "
                          "more accurate", (("accuracy_diff_points", ">", 0.0),)),
}





def _per_problem(workdir, result) -> list[dict[str, np.ndarray]] | None:
  """Per benchmark of one evaluation, each problem's accuracy and mean length over its samples,
  read from the evaluation's files; None when a file is missing."""
  out = []
  for name in result["benchmarks"]:
    s = benchmarks.read_samples(workdir, result["label"], name)
    if not s or not s["problem_ids"]:
      return None
    ids = np.asarray(s["problem_ids"])
    counts = np.bincount(ids)
    out.append({key: np.bincount(ids, weights=np.asarray(s[field], np.float64)) / counts
                for key, field in (("accuracy", "correct"), ("mean_length", "lengths"))})
  return out


_METRICS = (("accuracy", 100.0, "accuracy_pct", "accuracy_diff_points"),
            ("mean_length", 1.0, "mean_length", "length_diff_tokens"))


def _figures(evals, base, samples) -> dict:
  """accuracy_pct, mean_length and, given a base, their differences (points, tokens, %), each
  with a `_ci`. evals: per seed, (result, per-problem data or None); base likewise or None."""
  data = [pp for _, pp in evals] + ([base[1]] if base else [])
  if any(pp is None for pp in data) or len({tuple(len(s["accuracy"]) for s in pp)
                                            for pp in data}) != 1:
    return _figures_without_intervals(evals, base)
  out = {}
  for metric, scale, name, diff_name in _METRICS:
    arm = [scale * np.stack([pp[k][metric] for _, pp in evals]) for k in range(len(data[0]))]
    b = stats.hierarchical_bootstrap(arm, [scale * s[metric] for s in base[1]] if base else None,
                                     samples=samples)
    out[name], out[name + "_ci"] = b["value"], b["ci"]
    if base:
      out[diff_name], out[diff_name + "_ci"] = b["diff"], b["diff_ci"]
    if base and metric == "mean_length":
      out["length_diff_pct"], out["length_diff_pct_ci"] = b["diff_pct"], b["diff_pct_ci"]
  return out


def _figures_without_intervals(evals, base) -> dict:
  """The same values from results.json, intervals None: without every evaluation's sample
  file (or with evaluations on different problems) there is nothing to resample."""
  out = {}
  for metric, scale, name, diff_name in _METRICS:
    out[name] = scale * float(np.mean([r[metric] for r, _ in evals]))
    out[name + "_ci"] = None
    if base:
      out[diff_name], out[diff_name + "_ci"] = out[name] - scale * base[0][metric], None
  if base:
    base_length = base[0]["mean_length"]
    out["length_diff_pct"] = (100 * out["length_diff_tokens"] / base_length if base_length
                              else float("nan"))
    out["length_diff_pct_ci"] = None
  return out


def verdict(claim: Claim, row: dict) -> str:
  """'yes' when every test's interval lies on the claimed side, 'no' when one lies entirely on
  the other side (touching the threshold counts as the other side), else 'not shown'."""
  shown, refuted = True, False
  for key, side, threshold in claim.tests:
    ci = row.get(key + "_ci")
    if ci is None or any(math.isnan(x) for x in ci):
      shown = False
      continue
    lo, hi = ci
    holds, against = (hi < threshold, lo >= threshold) if side == "<" else \
        (lo > threshold, hi <= threshold)
    shown &= holds
    refuted |= against
  return "no" if refuted else "yes" if shown else "not shown"


def claim_key(rollout_filter: str, thinking: bool) -> str | None:
  key = rollout_filter if thinking else "thinking_off"
  return key if key in CLAIMS else None


def _base_results(results):
  """(key, result) of the checkpoint the branches start from, in each student thinking mode."""
  key = next((r["base"] for r in results.get("grid", {}).values() if "base" in r), None)
  key = key or next((k for k in ("rlvr", "sft", "init") if k in results), None)
  return {True: (key, results.get(key)),
          False: ("grid_base_thinking_off", results.get("grid_base_thinking_off"))}


def _evaluation(workdir, result):
  return (result, _per_problem(workdir, result)) if result else None


def _base_row(workdir, name, result, thinking, samples):
  row = dict(name=name, thinking=thinking, seeds=None, trained_tokens=0,
             hesitation_mean_per_response=result.get("hesitation_mean_per_response"))
  row.update(_figures([_evaluation(workdir, result)], None, samples))
  return row


def base_rows(workdir, results, samples=stats.SAMPLES) -> list[dict]:
  """The starting checkpoint in each student mode the grid uses, and SFT's output in both
  modes (when SFT is not the base), each one evaluation: intervals over problems alone."""
  bases = _base_results(results)
  key = bases[True][0]
  rows = []
  for name, result, thinking in (
      (f"base = {key} (thinking on)", bases[True][1], True),
      (f"base = {key} / thinking off", bases[False][1], False),
      ("sft (thinking on)", results.get("sft") if key != "sft" else None, True),
      ("sft / thinking off", results.get("grid_sft_thinking_off"), False)):
    if result:
      rows.append(_base_row(workdir, name, result, thinking, samples))
  return rows


def _arm_groups(branch_results) -> dict[tuple, list[tuple[str, dict]]]:
  """(rollout filter, divergence label, thinking, horizon) -> [(branch name, result)], in
  first-seen order."""
  groups = {}
  for name, r in branch_results.items():
    key = (r["rollout_filter"], r["divergence"], r.get("thinking", True), r.get("horizon", 1))
    groups.setdefault(key, []).append((name, r))
  return groups


def summarize(workdir, results, samples=stats.SAMPLES) -> list[dict]:
  """One row per arm: seeds, accuracy (%) and mean length with intervals, the paired
  differences to the base of the arm's thinking mode, markers per response and trained tokens
  (means over seeds), the claim tested and whether it reproduces."""
  bases = {thinking: _evaluation(workdir, r) for thinking, (_, r) in
           _base_results(results).items()}
  rows = []
  for (rollout_filter, divergence, thinking, horizon), members in \
      _arm_groups(results["grid"]).items():
    evals = [(r, _per_problem(os.path.join(workdir, "grid", name), r)) for name, r in members]
    row = dict(name=arm_name(rollout_filter, divergence, thinking, horizon),
               rollout_filter=rollout_filter, divergence=divergence, thinking=thinking,
               horizon=horizon, seeds=len(members), seed_list=[r["seed"] for _, r in members],
               branches=[name for name, _ in members],
               opsd_steps=members[0][1].get("opsd_steps"),
               hesitation_mean_per_response=float(np.mean(
                   [r["hesitation_mean_per_response"] for _, r in members])),
               trained_tokens=float(np.mean([r["trained_tokens"] for _, r in members])))
    row.update(_figures(evals, bases[thinking], samples))
    key = claim_key(rollout_filter, thinking)
    row["claim"] = key
    row["reproduces"] = verdict(CLAIMS[key], row) if key and bases[thinking] else "–"
    rows.append(row)
  return rows


def thinking_gaps(workdir, results, samples=stats.SAMPLES) -> list[dict]:
  """Thinking off against thinking on of the same checkpoint (SFT, the base), paired over
  problems: after SFT thinking off should be clearly less accurate."""
  bases = _base_results(results)
  pairs = [(f"base = {bases[True][0]}", bases[True][1], bases[False][1])]
  if bases[True][0] != "sft":
    pairs.insert(0, ("sft", results.get("sft"), results.get("grid_sft_thinking_off")))
  out = []
  for name, on, off in pairs:
    if on and off:
      row = dict(name=name)
      row.update(_figures([_evaluation(workdir, off)], _evaluation(workdir, on), samples))
      out.append(row)
  return out


# Long horizon: the rollouts of each training step, from the branch's metrics.jsonl.

def _trajectory(workdir, branch_name) -> list[dict]:
  path = os.path.join(workdir, "grid", branch_name)
  return [dict(step=r["step"], accuracy=r.get("accuracy"),
               mean_length=r.get("completions/mean_length"))
          for r in metrics.Logger(path, tensorboard=False).records("opsd")]


def _window_mean(curves, key, end, width) -> float:
  """Mean over seeds of the mean over the steps (end - width, end]: one step's rollouts are
  few and noisy."""
  per_seed = [[p[key] for p in points if end - width < p["step"] <= end and p[key] is not None]
              for points in curves.values()]
  per_seed = [np.mean(v) for v in per_seed if v]
  return float(np.mean(per_seed)) if per_seed else float("nan")


def long_horizon(workdir, rows) -> list[dict]:
  """Per long-horizon arm: each seed's trajectory, and the rollout length / accuracy (mean over
  seeds) at the 1x step count and at the end."""
  out = []
  for row in rows:
    if row["horizon"] == 1 or not row.get("opsd_steps"):
      continue
    end = row["opsd_steps"]
    short = end // row["horizon"]
    width = max(1, short // 10)
    curves = {seed: _trajectory(workdir, name)
              for seed, name in zip(row["seed_list"], row["branches"])}
    out.append(dict(name=row["name"], steps_1x=short, steps=end, window=width,
                    seeds=row["seed_list"], curves=curves,
                    **{f"rollout_{key}_{at}": _window_mean(curves, key, step, width)
                       for key in ("mean_length", "accuracy")
                       for at, step in (("1x", short), ("end", end))}))
  return out


def plot_long_horizon(arms, path) -> str:
  """Rollout mean length and accuracy against the step, a line per (arm, seed), the 1x step
  count marked."""
  plt = evaluate._pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
  for axis, key, title in zip(axes[0], ("mean_length", "accuracy"),
                              ("rollout mean length (tokens)", "rollout accuracy")):
    for i, arm in enumerate(arms):
      for j, (seed, points) in enumerate(arm["curves"].items()):
        xs = [p["step"] for p in points if p[key] is not None]
        ys = [p[key] for p in points if p[key] is not None]
        axis.plot(xs, ys, color=f"C{i % 10}", alpha=0.4 + 0.6 / (j + 1), linewidth=1,
                  label=f"{arm['name']} seed {seed}")
      axis.axvline(arm["steps_1x"], color="gray", linestyle="--", linewidth=1)
    axis.set_xlabel("step (dashed: the 1x arm's steps)")
    axis.set_title(title)
  axes[0][0].legend(fontsize=7)
  figure.tight_layout()
  evaluate._save(plt, figure, path)
  return path


# Formatting

def _cell(value, ci, fmt, signed=False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  f = "{:+" + fmt + "}" if signed else "{:" + fmt + "}"
  return f.format(value) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def _table_row(row) -> dict:
  claim = CLAIMS.get(row.get("claim") or "")
  return dict(
      arm=row["name"], seeds="–" if row["seeds"] is None else row["seeds"],
      accuracy=_cell(row["accuracy_pct"], row["accuracy_pct_ci"], ".1f"),
      accuracy_diff=_cell(row.get("accuracy_diff_points"), row.get("accuracy_diff_points_ci"),
                          ".1f", signed=True),
      length=_cell(row["mean_length"], row["mean_length_ci"], ".1f"),
      length_diff=_cell(row.get("length_diff_pct"), row.get("length_diff_pct_ci"), ".1f",
                        signed=True),
      markers=_cell(row.get("hesitation_mean_per_response"), None, ".2f"),
      trained_tokens=_cell(row.get("trained_tokens"), None, ",.0f"),
      claim=f"{claim.paper}: {claim.claim}" if claim else "–",
      reproduces=row.get("reproduces", ""))


_TABLE = (("arm", "arm"), ("seeds", "seeds"), ("accuracy", "accuracy % [95 % CI]"),
          ("accuracy_diff", "Δ accuracy vs base, points [CI]"),
          ("length", "mean length, tokens [CI]"), ("length_diff", "Δ length vs base, % [CI]"),
          ("markers", "hesitation markers / response"), ("trained_tokens", "trained tokens"),
          ("claim", "paper claim"), ("reproduces", "reproduces"))


_TEST_NAMES = {"length_diff_pct": "Δ length (%)", "accuracy_diff_points": "Δ accuracy (points)"}


def _test_text(tests) -> str:
  return " and ".join(f"{_TEST_NAMES[key]} interval entirely {side} {threshold:g}"
                      for key, side, threshold in tests)


def _markdown(bases, rows, gaps, long, samples) -> str:
  table = evaluate.results_table([_table_row(r) for r in bases + rows],
                                 [c for c, _ in _TABLE], [h for _, h in _TABLE])
  claims = evaluate.results_table(
      [dict(arms=("thinking-off arms" if key == "thinking_off" else f"{key} arms (thinking on)"),
            paper=c.paper, claim=c.claim, test=_test_text(c.tests)) for key, c in CLAIMS.items()])
  text = (
      "# OPSD grid\n\nEvery branch starts from the same checkpoint (the base rows: it evaluated "
      "once in each student thinking mode); thinking-off arms are evaluated with thinking off and "
      "compared with the base evaluated with thinking off, the others with thinking on. Markers "
      "per response and trained tokens: means over the seeds.\n\n"
      f"Intervals: {100 * stats.LEVEL:g} % percentile intervals of a two-level bootstrap "
      f"(B = {samples} resamples, fixed seed {stats.SEED}): each resample draws the arm's seeds "
      "with replacement and the held-out problems with replacement (per benchmark; the same "
      "problem draw for every seed of the arm and for the base), and takes the mean over the "
      "drawn seeds of each seed's mean over the drawn problems' samples. Δ = arm − base on the "
      "same draw (paired). A base row is one evaluation: its interval is over problems alone.\n\n"
      + table + "\n\n## Paper claims tested\n\nreproduces: yes when the intervals show the "
      "claim, no when one shows the opposite side, not shown otherwise; – no claim for the arm."
      "\n\n" + claims + "\n")
  if gaps:
    text += "\n## Thinking off against thinking on (same checkpoint, paired over problems)\n\n"
    for g in gaps:
      accuracy = _cell(g["accuracy_diff_points"], g["accuracy_diff_points_ci"], ".1f", True)
      length = _cell(g["length_diff_pct"], g["length_diff_pct_ci"], ".1f", True)
      text += f"- {g['name']}: accuracy {accuracy} points, length {length} %\n"
  if long:
    text += ("\n## Long horizon\n\nThe training rollouts (mean over seeds) at the 1x arm's step "
             "count and at the end; the held-out evaluation is the arm's row above. Plot: "
             "grid_long_horizon.png.\n\n")
    text += "".join(
        f"- {a['name']} (seeds {', '.join(map(str, a['seeds']))}): rollout mean length "
        f"{a['rollout_mean_length_1x']:.1f} at step {a['steps_1x']} (1x) → "
        f"{a['rollout_mean_length_end']:.1f} at step {a['steps']}; rollout accuracy "
        f"{a['rollout_accuracy_1x']:.3f} → {a['rollout_accuracy_end']:.3f} (each: the mean "
        f"over the {a['window']} step(s) up to it)\n" for a in long)
  return text


def _json_ready(value):
  """NaN as null: grid_summary.json is strict JSON for any reader."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  return value


def _plot_rows(rows):
  """Asymmetric error bars from the intervals (none where a row has no interval)."""
  def err(value, ci):
    return None if ci is None else [[value - ci[0]], [ci[1] - value]]
  return [{"name": r["name"], "mean length (tokens)": r["mean_length"],
           "accuracy (%)": r["accuracy_pct"], "x_err": err(r["mean_length"], r["mean_length_ci"]),
           "y_err": err(r["accuracy_pct"], r["accuracy_pct_ci"])} for r in rows]


def report(workdir, results, samples=stats.SAMPLES):
  """grid.md, grid_summary.json, grid.png and (long-horizon arms) grid_long_horizon.png."""
  bases = base_rows(workdir, results, samples)
  rows = summarize(workdir, results, samples)
  gaps = thinking_gaps(workdir, results, samples)
  long = long_horizon(workdir, rows)
  text = _markdown(bases, rows, gaps, long, samples)
  metrics.write_text_atomic(os.path.join(workdir, "grid.md"), text)
  summary = dict(
      bootstrap=dict(samples=samples, seed=stats.SEED, level=stats.LEVEL,
                     levels=["seeds", "problems"]),
      claims={k: dataclasses.asdict(c) for k, c in CLAIMS.items()},
      base=bases, arms=rows, thinking_gaps=gaps,
      long_horizon=[{k: v for k, v in a.items() if k != "curves"} for a in long])
  metrics.write_text_atomic(os.path.join(workdir, "grid_summary.json"),
                            json.dumps(_json_ready(summary), indent=2, allow_nan=False))
  evaluate.plot_scatter(_plot_rows(bases + rows), os.path.join(workdir, "grid.png"),
                        x_key="mean length (tokens)", y_key="accuracy (%)", label_key="name",
                        x_err_key="x_err", y_err_key="y_err",
                        title=f"OPSD grid: accuracy vs length, {100 * stats.LEVEL:g} % intervals")
  if long:
    plot_long_horizon(long, os.path.join(workdir, "grid_long_horizon.png"))
  results_lib.say(text)


def main(argv):
  if len(argv) != 1:
    raise SystemExit("usage: python -m opsd_jax.grid_report WORKDIR  (rewrites WORKDIR/grid.md, "
                     "grid_summary.json and the plots from WORKDIR/results.json and the "
                     "evaluations' sample files)")
  path = os.path.join(argv[0], "results.json")
  if not os.path.isfile(path):
    raise SystemExit(f"error: no results at {path!r}")
  with open(path) as f:
    results = json.load(f)
  if not results.get("grid"):
    raise SystemExit(f"error: {path!r} holds no finished grid branch yet")
  report(argv[0], results)


if __name__ == "__main__":
  main(sys.argv[1:])
