"""The CLI end to end (`python -m opsd_jax.main`), run as a user runs it: a subprocess.

One tiny SFT -> RLVR -> OPSD run is shared by the tests of this module (results, rerun, resume),
so the whole file costs about three small runs. The settings make every stage really update the
model even from scratch: RLVR's over-length penalty gives rewards a spread inside each group
(no correct answers yet), and OPSD trains on all rollouts, not only correct ones.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipeline_helpers import STEPS, TINY, TOY, REPO, assert_ok as _assert_ok, \
    assert_same_run, command as _command, env as _env, final_params as _final_params, \
    records as _records, reference_run, run as _run, wait_for_record as _wait_for_record


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  return reference_run(tmp_path_factory)


# --------------------------------------------------------------------------------------------
# A full run, its rerun, and a resume after SIGKILL
# --------------------------------------------------------------------------------------------


def test_full_run_writes_results_metrics_and_plots(full_run):
  workdir, proc, _ = full_run
  for name in ("results.md", "results.json", "metrics.jsonl", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for name in ("stages.png", "curves.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir / "tb"))

  records = _records(workdir)
  for stage, n in STEPS.items():
    steps = [r["step"] for r in records if r["stage"] == stage]
    assert steps == list(range(1, n + 1)), (stage, steps)
  # every stage really trained: updates were made and the parameters moved
  assert all(r["updates"] > 0 for r in records if r["stage"] in ("rlvr", "opsd"))
  assert all(np.isfinite(r["loss"]) for r in records)
  finals = {s: _final_params(workdir, s) for s in STEPS}
  for before, after in (("sft", "rlvr"), ("rlvr", "opsd")):
    assert any(not np.array_equal(finals[before][k], finals[after][k]) for k in finals[before])

  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"init", "data", *STEPS}
  assert results["data"]["train"]["fit"]["rows"] == 1000  # every row fits the toy's buckets
  for stage in ("init", *STEPS):
    r = results[stage]
    assert r["num_problems"] == 32 and r["count"] == 32, stage
    assert 0.0 <= r["accuracy"] <= 1.0 and 1 <= r["mean_length"] <= 96, stage
  table = (workdir / "results.md").read_text()
  for stage in ("init", *STEPS):
    assert f"| {stage} |" in table
  assert proc.stdout.count("[eval ") == 4


def test_rerun_skips_finished_stages(full_run):
  workdir, _, first_seconds = full_run
  results_before = (workdir / "results.json").read_text()
  metrics_before = (workdir / "metrics.jsonl").read_text()
  proc, seconds = _run(TOY, workdir, *TINY)
  _assert_ok(proc)
  for stage in STEPS:
    assert f"{stage}: already done" in proc.stdout
  assert "[eval " not in proc.stdout  # nothing evaluated or trained again
  assert (workdir / "results.json").read_text() == results_before
  assert (workdir / "metrics.jsonl").read_text() == metrics_before
  assert seconds < first_seconds, (seconds, first_seconds)


def test_sigkill_mid_stage_then_rerun_resumes_and_matches_uninterrupted(full_run, tmp_path):
  reference, _, _ = full_run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_command(TOY, workdir, *TINY), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  try:
    _wait_for_record(workdir, "rlvr", 3, proc)  # checkpoints at 2 and 4: step 3 is lost work
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:  # grader workers die with their parent; make sure nothing of this session lingers
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert not (workdir / "rlvr" / "final").exists(), "the kill came after rlvr had finished"
  assert (workdir / "sft" / "final").exists()

  proc2, _ = _run(TOY, workdir, *TINY)
  _assert_ok(proc2)
  assert "sft: already done" in proc2.stdout
  resumed = [line for line in proc2.stdout.splitlines() if line.startswith("rlvr: resumed")]
  assert resumed and 2 <= int(resumed[0].split()[-1]) < STEPS["rlvr"], proc2.stdout[-2000:]

  # bit for bit the uninterrupted run's parameters (CPU is deterministic), and its metrics and
  # evaluations too (the lost step's record was dropped and redone, not duplicated)
  assert_same_run(workdir, reference, stages=("rlvr", "opsd"))


# --------------------------------------------------------------------------------------------
# --dry_run and bad overrides
# --------------------------------------------------------------------------------------------


def _hf_param_count(model_section) -> int:
  """Parameters of the same architecture built by transformers on the meta device (no memory)."""
  import torch
  import transformers
  m = model_section
  hf_config = transformers.Qwen3Config(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], num_hidden_layers=m["n_layers"],
      num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
      head_dim=m["head_dim"], intermediate_size=m["mlp_dim"],
      tie_word_embeddings=m["tie_embeddings"])
  with torch.device("meta"):
    model = transformers.Qwen3ForCausalLM(hf_config)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["toy_compaction"])  # the paper presets: test_real_run.py
def test_dry_run_prints_plan_without_training(name, tmp_path):
  config = os.path.join(REPO, "experiments", f"{name}.py")
  workdir = tmp_path / "dry"
  proc, _ = _run(config, workdir, "--dry_run", timeout=120)
  _assert_ok(proc)
  sys.path.insert(0, REPO)
  try:
    import importlib
    cfg = importlib.import_module(f"experiments.{name}").get_config()
  finally:
    sys.path.remove(REPO)
  out = proc.stdout
  assert " -> ".join(cfg.stages) in out
  for stage in cfg.stages:
    line = next(l for l in out.splitlines() if l.startswith(f"stage {stage}:"))
    assert f"{cfg[stage].steps} steps" in line and "memory per device" in line
  model = cfg.model.to_dict()
  if model["vocab_size"] == 0:
    model["vocab_size"] = 512  # the plan's stand-in for the toy tokenizer's size
  printed = float(out.split("params=")[1].split("M")[0])
  assert printed == pytest.approx(_hf_param_count(model) / 1e6, abs=0.006)
  assert not workdir.exists() or not any(workdir.iterdir()), "a dry run wrote files"
  assert "[eval" not in out


@pytest.mark.parametrize("override, key", [
    ("--config.rlvr.group_size=1", "rlvr.group_size"),
    ("--config.nosuchkey=1", "nosuchkey"),
    ("--config.opsd.divergence=xx", "opsd.divergence"),
    ("--config.sft.steps=many", "sft.steps"),
])
def test_bad_override_exits_nonzero_with_one_line(override, key, tmp_path):
  proc, _ = _run(TOY, tmp_path / "bad", override, "--dry_run", timeout=120)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and key in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_error_inside_an_experiment_file_is_one_line_naming_it(tmp_path):
  """An experiment file written for an older schema (dynamic_sampling was a bool) fails while
  it loads, inside ml_collections: one line naming the file and the key, with what it meant."""
  old = tmp_path / "old_experiment.py"
  old.write_text("from opsd_jax import config as config_lib\n\n\ndef get_config():\n"
                 "  c = config_lib.default_config()\n"
                 "  c.rlvr.update(dict(dynamic_sampling=True))\n  return c\n")
  proc, _ = _run(str(old), tmp_path / "w", "--dry_run", timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert str(old) in lines[0] and "'dynamic_sampling'" in lines[0]
  assert "True meant 'mask'" in lines[0]
