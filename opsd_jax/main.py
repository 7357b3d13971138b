"""Runs an experiment file's stages in order: SFT -> RLVR -> OPSD.

  python -m opsd_jax.main --config experiments/toy_compaction.py --workdir runs/toy \
      [--config.rlvr.group_size=16] [--dry_run]

Each stage starts from the previous stage's final checkpoint (or `init_from`, a Hugging Face
directory), is evaluated on held-out problems before and after, and checkpoints as it goes, so
rerunning the same command resumes where it stopped. At the end the workdir holds results.md (a
table per stage), results.json, metrics.jsonl, TensorBoard events and plots.

Multi-host: run the same command on every host. On a TPU VM slice JAX finds its peers itself;
elsewhere set $OPSD_COORDINATOR (host:port of process 0), $OPSD_NUM_PROCESSES, $OPSD_PROCESS_ID.

Exit status: 0 done; 2 bad config or input (files, data, tokenizer, checkpoints); 1 a non-finite
loss or gradient with on_nonfinite='stop' (the last good checkpoint is kept); 143 SIGTERM
(preemption: the current step was checkpointed; rerun the same command to resume). Each failure
prints one line to stderr.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from opsd_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate and print the plan; train nothing.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every array it writes at INFO
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  from opsd_jax import host_malloc, parallel
  try:
    host_malloc.configure_from_env()  # before JAX starts: XLA:CPU's threads bind to it then
  except ValueError as e:
    return _fail("error", e, 2)
  # Multi-host: join the other processes first, so the mesh check below sees every device.
  parallel.initialize_distributed()
  from opsd_jax import experiment  # the modules whose choices it checks come with it
  try:
    cfg = experiment.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  from opsd_jax import pipeline  # heavy imports only after the config is known to be good
  start = time.time()
  try:
    if _DRY_RUN.value:
      if parallel.is_primary():
        print(pipeline.plan(cfg, _WORKDIR.value))
      return 0
    pipeline.run(cfg, _WORKDIR.value)
  except pipeline.INPUT_ERRORS as e:
    return _fail("error", e, 2)
  except pipeline.NonFiniteError as e:
    return _fail("numerical error", e, 1)
  except pipeline.Preempted as e:
    return _fail("preempted", e, PREEMPTED_EXIT)
  if parallel.is_primary():  # multi-host: one process reports (and only it wrote the files)
    print(f"done in {time.time() - start:.0f} s; results in {_WORKDIR.value}/results.md")
  return 0


PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


def _fail(kind, error, code):
  """One line on stderr (messages from libraries may span lines), then exit at once: after a
  failed restore, tensorstore's threads print tracebacks of their own at interpreter shutdown,
  which would bury the line."""
  sys.stdout.flush()
  sys.stderr.flush()
  # One write(2) call, starting on a fresh line: library threads writing to stderr at the same
  # moment can neither split the line nor run into its start.
  line = f"\n{kind}: {' '.join(str(error).split())}\n"
  os.write(sys.stderr.fileno(), line.encode("utf-8", "replace"))
  os._exit(code)


def parse_flags(argv):
  """absl's parser, but a bad --config.* override (unknown key, unparsable value) ends in one
  line naming it and exit status 2, instead of a traceback (unknown keys raise outside absl)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = _short(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: a key the experiment does not have
    missing = str(e).split("\n")[0].strip("\"' ")
    given = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")
             and missing in a.split("=")[0].split(".")]
    message = f"{given[0] if given else missing}: no such config key ({missing!r})"
  print(f"config error: {message}", file=sys.stderr)
  sys.exit(2)


def _short(message: str) -> str:
  """An error raised inside the experiment file reaches absl as the whole traceback: keep its
  first and last lines (the file, the exception), and say what an old value of a key whose type
  changed meant."""
  lines = [line for line in message.splitlines() if line.strip()]
  if len(lines) > 2 and "Traceback" in message:
    message = f"{lines[0].rstrip(':')}: {lines[-1]}"
  if "'dynamic_sampling'" in message and "bool" in message:
    message += (" (rlvr.dynamic_sampling is now one of 'off', 'mask', 'refill': True meant "
                "'mask', False 'off')")
  return message


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
