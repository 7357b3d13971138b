"""Faults a long run meets, through the CLI as a user runs it: a non-finite loss or gradient
(stop with one line and keep the last good checkpoint, or skip and count), corrupt or missing
checkpoint files, a tokenizer that does not fit the model, missing or malformed data and
tokenizer files; and our own output files, which a kill mid-write must never leave half-written.

The non-finite fault is injected by OPSD_JAX_INJECT_NAN (train/loop.py): a NaN written into the
parameters before a chosen update, so the real step, guard, loop and CLI handle it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline_helpers import REPO, TINY_MODEL, TOY, assert_ok, env, error_line, records, run

SFT_STEPS = 4
SFT_ONLY = TINY_MODEL + [
    "--config.stages=('sft',)", "--config.data.num_train=200", "--config.data.num_test=4",
    "--config.eval.num_problems=4", "--config.eval.max_new_tokens=8", "--config.sft.batch_size=4",
    f"--config.sft.steps={SFT_STEPS}", "--config.sft.checkpoint_every=1",
]
NAN_AT_3 = {"OPSD_JAX_INJECT_NAN": "sft:3"}


def _copy(workdir, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(workdir, target)
  return target


# --------------------------------------------------------------------------------------------
# Non-finite loss / gradient
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_stopped(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nan_stop")
  proc, _ = run(TOY, workdir, *SFT_ONLY, extra_env=NAN_AT_3)
  return workdir, proc


@pytest.fixture(scope="module")
def nan_stopped_then_resumed(nan_stopped, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nan_resume") / "run"
  shutil.copytree(nan_stopped[0], workdir)
  proc, _ = run(TOY, workdir, *SFT_ONLY)  # the fault is gone: the same command goes on
  return workdir, proc


def test_nonfinite_stops_with_one_line_and_keeps_the_last_good_checkpoint(nan_stopped):
  from opsd_jax import checkpoint
  workdir, proc = nan_stopped
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  line = error_line(proc, "numerical error:")
  assert "sft step 3: non-finite loss, grad_norm" in line, line
  assert re.search(r"last good checkpoint: step 2 in \S+/sft/ckpt$", line), line
  assert [r["step"] for r in records(workdir)] == [1, 2]  # the bad step logged nothing
  assert not (workdir / "sft" / "final").exists()
  ckpt = workdir / "sft" / "ckpt"
  assert checkpoint.latest_step(str(ckpt)) == 2
  state, extra = checkpoint.restore(str(ckpt))
  assert int(state["step"]) == 2 and int(state["skipped_steps"]) == 0 and extra["data"]
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state["params"])]
  assert leaves and all(np.isfinite(x).all() for x in leaves)


def test_rerun_after_a_nonfinite_stop_resumes_from_the_last_good_checkpoint(
    nan_stopped_then_resumed):
  workdir, proc = nan_stopped_then_resumed
  assert_ok(proc)
  assert "sft: resumed from step 2" in proc.stdout
  rows = records(workdir)
  assert [r["step"] for r in rows] == list(range(1, SFT_STEPS + 1))
  assert all(np.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in rows)


def test_skip_mode_skips_and_counts_nonfinite_updates(tmp_path):
  proc, _ = run(TOY, tmp_path / "skip", *SFT_ONLY, "--config.on_nonfinite=skip",
                extra_env=NAN_AT_3)
  assert_ok(proc)
  warnings = [l for l in proc.stdout.splitlines() if l.startswith("warning: sft step")]
  # the NaN stays in the parameters (a skipped update keeps them), so every later update skips
  assert [l.split(":")[1].strip() for l in warnings] == ["sft step 3", "sft step 4"]
  assert all("non-finite loss" in l and "on_nonfinite='skip'" in l for l in warnings)
  rows = records(tmp_path / "skip")
  assert [r["nonfinite"] for r in rows] == [0, 0, 1, 1]
  assert [r["skipped_updates"] for r in rows] == [0, 0, 1, 2]


# --------------------------------------------------------------------------------------------
# Corrupt or missing checkpoint files
# --------------------------------------------------------------------------------------------


def _largest_file(directory):
  files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_stage_checkpoint_is_one_clear_error(nan_stopped, tmp_path, damage):
  workdir = _copy(nan_stopped[0], tmp_path, damage)
  step_dir = workdir / "sft" / "ckpt" / "2"
  victim = _largest_file(step_dir / "state")
  if damage == "truncated":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    os.remove(victim)
  proc, _ = run(TOY, workdir, *SFT_ONLY)
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
  line = error_line(proc)
  assert line.startswith("error: sft: cannot resume: checkpoint ") and str(step_dir) in line, line
  assert f"delete {step_dir}" in line, line


def test_damaged_final_parameters_are_one_clear_error(nan_stopped_then_resumed, tmp_path):
  workdir = _copy(nan_stopped_then_resumed[0], tmp_path, "final")
  victim = _largest_file(workdir / "sft" / "final")
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  proc, _ = run(TOY, workdir, *SFT_ONLY)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "sft: already done" in proc.stdout
  line = error_line(proc)
  assert "parameter snapshot" in line and str(workdir / "sft" / "final") in line, line


def test_malformed_results_json_is_one_clear_error(nan_stopped_then_resumed, tmp_path):
  workdir = _copy(nan_stopped_then_resumed[0], tmp_path, "results")
  (workdir / "results.json").write_text('{"init": {"accuracy": 0.')
  proc, _ = run(TOY, workdir, *SFT_ONLY)
  assert proc.returncode == 2
  line = error_line(proc)
  assert "results.json is not valid JSON" in line, line


# --------------------------------------------------------------------------------------------
# Tokenizer and data files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
  """A sentencepiece tokenizer and a GSM8K-style JSONL file, made on the spot."""
  from opsd_jax.data import toy
  directory = tmp_path_factory.mktemp("files")
  train, _ = toy.make_splits(0, 50, 0)
  tok = toy.build_tokenizer(train, str(directory))
  data = directory / "gsm8k.jsonl"
  data.write_text("".join(json.dumps({"question": p["question"], "answer": p["reference"] +
                                      f"\n#### {p['answer']}"}) + "\n" for p in train))
  return directory, tok, data


def _jsonl_args(train, test, tokenizer_kind, tokenizer_path):
  return [*SFT_ONLY, "--config.data.kind=jsonl", f"--config.data.train_path={train}",
          f"--config.data.test_path={test}", f"--config.tokenizer.kind={tokenizer_kind}",
          f"--config.tokenizer.path={tokenizer_path}"]


def test_tokenizer_larger_than_the_model_vocabulary_is_one_clear_error(tmp_path):
  proc, _ = run(TOY, tmp_path / "vocab", *SFT_ONLY, "--config.model.vocab_size=100")
  assert proc.returncode == 2
  line = error_line(proc)
  assert re.search(r"tokenizer has \d+ tokens but the model's vocab_size is 100", line), line
  assert not os.path.exists(tmp_path / "vocab" / "sft"), "it trained before checking"


def _bad_input_cases(directory, tok, data):
  del tok
  model = str(next(directory.glob("toy_tokenizer_*.model")))
  broken = directory / "broken.jsonl"
  lines = data.read_text().splitlines()
  broken.write_text("\n".join([lines[0], '{"question": "What is 1 + 1?", "answer": ',
                               *lines[1:]]) + "\n")
  surrogate = directory / "surrogate.jsonl"  # valid JSON, but "\ud800" is no character
  surrogate.write_text(lines[0] + "\n" +
                       '{"question": "What is \\ud800?", "answer": "1 #### 1"}\n')
  not_model = directory / "not_a_model.model"
  not_model.write_bytes(b"this is not a sentencepiece model")
  return {
      "missing train file": (_jsonl_args(directory / "nope.jsonl", data, "sentencepiece", model),
                             "data.train_path: no file at"),
      "missing test file": (_jsonl_args(data, directory / "nope.jsonl", "sentencepiece", model),
                            "data.test_path: no file at"),
      "malformed row": (_jsonl_args(broken, data, "sentencepiece", model),
                        f"{broken}:2: malformed JSON"),
      "lone surrogate": (_jsonl_args(surrogate, data, "sentencepiece", model),
                         f"{surrogate}:2: field 'question' is not valid Unicode"),
      "missing tokenizer": (_jsonl_args(data, data, "sentencepiece", directory / "nope.model"),
                            "sentencepiece model file not found"),
      "corrupt tokenizer": (_jsonl_args(data, data, "sentencepiece", not_model),
                            "not a sentencepiece model"),
      "missing hf tokenizer": (_jsonl_args(data, data, "hf", directory / "no_such_dir"),
                               "no tokenizer.json in"),
      "toy tokenizer on jsonl": (_jsonl_args(data, data, "toy", ""), "tokenizer.kind='toy'"),
  }


BAD_INPUTS = ["missing train file", "missing test file", "malformed row", "lone surrogate",
              "missing tokenizer", "corrupt tokenizer", "missing hf tokenizer",
              "toy tokenizer on jsonl"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_data_or_tokenizer_file_is_one_clear_error(local_files, tmp_path, case):
  args, expected = _bad_input_cases(*local_files)[case]
  proc, _ = run(TOY, tmp_path / "bad", *args)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  # A setting the data path would ignore is caught with the config, before any file is read.
  line = error_line(proc, "config error:" if case == "toy tokenizer on jsonl" else "error:")
  assert expected in line, line
  assert not os.path.exists(tmp_path / "bad" / "sft"), "it trained before checking"


# --------------------------------------------------------------------------------------------
# Atomic outputs: kill a process while it rewrites a file, over and over
# --------------------------------------------------------------------------------------------

_WRITER = r"""
import sys
from opsd_jax import evaluate, metrics
mode, path = sys.argv[1], sys.argv[2]
texts = ["A" * 8_000_000, "B" * 8_000_000]
rows = [{"stage": "sft", "step": i, "accuracy": i / 50, "mean_length": 50 - i} for i in range(50)]
i = 0
while True:
  if mode == "atomic":
    metrics.write_text_atomic(path, texts[i % 2])
  elif mode == "plain":  # the control: what an in-place write leaves when killed
    with open(path, "w") as f:
      f.write(texts[i % 2])
  else:
    evaluate.plot_curves(rows, path)
  if i == 0:
    print("ready", flush=True)  # one whole file is there: from now on the kill lands anywhere
  i += 1
"""

_PNG_END = b"IEND\xaeB`\x82"


def _kill_while_writing(mode, path, rng):
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, mode, str(path)], cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, 0.3))
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  data = path.read_bytes()  # a first write finished, so the file must be there
  if mode == "plot":
    return "complete" if data.startswith(b"\x89PNG") and data.endswith(_PNG_END) else "partial"
  return "complete" if data in (b"A" * 8_000_000, b"B" * 8_000_000) else "partial"


def test_files_killed_mid_write_are_never_half_written(tmp_path):
  rng = random.Random(0)
  # The check sees half-written files: in-place writes killed the same way leave some.
  plain = [_kill_while_writing("plain", tmp_path / "plain.txt", rng) for _ in range(8)]
  assert "partial" in plain, plain
  atomic = [_kill_while_writing("atomic", tmp_path / "results.json", rng) for _ in range(8)]
  assert set(atomic) == {"complete"}, atomic
  plots = [_kill_while_writing("plot", tmp_path / "curves.png", rng) for _ in range(3)]
  assert set(plots) == {"complete"}, plots


def test_metrics_resume_drops_a_record_cut_short_by_a_kill(tmp_path):
  from opsd_jax import metrics
  logger = metrics.Logger(str(tmp_path), tensorboard=False)
  for step in range(1, 5):
    logger.write("rlvr", step, {"loss": float(step)})
  with open(logger.path, "a") as f:
    f.write('{"stage": "rlvr", "step": 5, "lo')  # the kill came mid-line
  assert [r["step"] for r in logger.records()] == [1, 2, 3, 4]
  logger.truncate_after("rlvr", 2)  # resume from the step-2 checkpoint
  logger.write("rlvr", 3, {"loss": 3.0})
  assert [(r["step"], r["loss"]) for r in logger.records()] == [(1, 1.0), (2, 2.0), (3, 3.0)]
  with open(logger.path) as f:
    assert all(line.endswith("\n") and json.loads(line) for line in f)
