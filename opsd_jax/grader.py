"""The grading pool: killable math-verify worker processes with hard wall-clock limits.

`Grader` grades a batch of responses (the RLVR reward, and every evaluation) with the answer logic
of `opsd_jax.verify`: the answer is extracted and the plain-number cases decided in this process;
only the checks that need math-verify go to the workers. `GradeResult` holds the verdicts and what
went wrong with each. Kept apart from `verify` so the verdict policy reads without the process
management; this module imports `verify`, never the other way at import time. Bench:
`python bench/verify.py`.

Why worker processes: math-verify's own timeout uses SIGALRM, which silently does nothing useful
outside the main thread (other frameworks then reward 0 for everything), and cannot interrupt
C-level work such as a huge integer power. A killable process bounds every check.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

import numpy as np

from opsd_jax import verify

# Address-space cap per worker, so one pathological parse cannot take the host's memory.
DEFAULT_WORKER_MEMORY_MB = 4096
# The soft limit (SIGALRM inside the worker, which then survives) as a fraction of the hard one.
_SOFT_FRACTION = 0.9
_WORKER_START_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------------------
# Worker process.

class _SoftTimeout(BaseException):
  """Raised by SIGALRM inside a worker; BaseException so library `except Exception` cannot eat it."""


def _raise_soft_timeout(signum, frame):
  raise _SoftTimeout()


def _worker_main(task_fd: int, reply_fd: int, memory_mb: int) -> None:
  """Worker loop: receive (task_id, answer, gold, soft_timeout_s); reply (task_id, status)."""
  from multiprocessing.connection import Connection
  tasks, replies = Connection(task_fd, writable=False), Connection(reply_fd, readable=False)
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
  _die_with_parent()
  logging.disable(logging.CRITICAL)  # math-verify logs every parse failure and timeout
  if memory_mb:
    import resource
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  verify.math_verify_equal("1", "1")  # import and warm up SymPy before announcing readiness
  signal.signal(signal.SIGALRM, _raise_soft_timeout)
  replies.send(("ready", None))
  while True:
    try:
      task = tasks.recv()
    except (EOFError, OSError):
      return  # the parent is gone
    if task is None:
      return
    task_id, answer, gold, soft_timeout_s = task
    status = "error"
    try:
      signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
      try:
        status = "equal" if verify.math_verify_equal(answer, gold) else "unequal"
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
      status = "timeout"
    except (Exception, RecursionError, MemoryError):
      status = "error"
    replies.send((task_id, status))


def _die_with_parent():
  """Linux: SIGKILL this worker when its parent dies, even mid-computation (best effort)."""
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
  except Exception:
    pass  # elsewhere a worker still exits at its next read, on EOF


# A fresh interpreter per worker (not multiprocessing spawn/forkserver, which re-run the parent's
# __main__ module in every child: slow for a JAX program, fatal for `python - < script`).
_WORKER_COMMAND = ("import sys; from opsd_jax.grader import _worker_main; "
                   "_worker_main(*map(int, sys.argv[1:]))")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Worker:
  def __init__(self, memory_mb: int | None):
    from multiprocessing.connection import Connection
    task_read, task_write = os.pipe()
    reply_read, reply_write = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    try:
      self.process = subprocess.Popen(
          [sys.executable, "-c", _WORKER_COMMAND, str(task_read), str(reply_write),
           str(memory_mb or 0)],
          pass_fds=(task_read, reply_write), stdin=subprocess.DEVNULL,
          stdout=subprocess.DEVNULL, env=env, cwd=_PACKAGE_PARENT)
    finally:
      os.close(task_read)
      os.close(reply_write)
    self.tasks = Connection(task_write, readable=False)
    self.replies = Connection(reply_read, writable=False)
    self.started = time.monotonic()
    self.ready = False
    self.task = None  # (index of the pair being checked, deadline)

  def kill(self):
    self.process.kill()
    self.process.wait()
    self.tasks.close()
    self.replies.close()

  def ask_to_exit(self):
    try:
      self.tasks.send(None)
    except OSError:
      pass

  def close(self):
    """Wait briefly for the exit asked for, else kill."""
    try:
      self.process.wait(timeout=2)
      self.tasks.close()
      self.replies.close()
    except (OSError, ValueError, subprocess.TimeoutExpired):
      self.kill()


# ------------------------------------------------------------------------------------------------
# Grading.

@dataclasses.dataclass
class GradeResult:
  """Per-response verdicts of one batch. Everything not `correct` is graded incorrect."""
  correct: np.ndarray          # bool [N]
  extracted: list              # str | None per response (None: no answer found)
  timed_out: np.ndarray        # bool [N]: the check ran past its limit (soft alarm or kill)
  truncated_input: np.ndarray  # bool [N]: the answer region exceeded max_chars (tail read)
  too_long: np.ndarray         # bool [N]: the extracted answer exceeded max_answer_chars
  failed: np.ndarray           # bool [N]: the check raised or its worker died
  fast_path: np.ndarray        # bool [N]: decided in the parent without math-verify
  unclosed_think: np.ndarray   # bool [N]: a `<think>` open at the end: no answer region

  @property
  def counts(self) -> dict:
    return dict(
        num=len(self.extracted),
        num_correct=int(self.correct.sum()),
        num_no_answer=sum(e is None for e in self.extracted),
        num_timed_out=int(self.timed_out.sum()),
        num_truncated_input=int(self.truncated_input.sum()),
        num_too_long=int(self.too_long.sum()),
        num_failed=int(self.failed.sum()),
        num_fast_path=int(self.fast_path.sum()),
        num_unclosed_think=int(self.unclosed_think.sum()))


class Grader:
  """A pool of killable math-verify worker processes; use as a context manager.

  Each check has a hard wall-clock limit `timeout_s`: a soft SIGALRM inside the worker at 90 % of
  it, and past the limit the worker is killed and replaced. Either way the check is incorrect and
  counted in `timed_out`. Thread-safe (one batch at a time). `after_think`: read the answer only
  after the last `</think>` (see `verify.answer_region`; False: the whole response).
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
               max_chars: int = verify.DEFAULT_MAX_CHARS,
               max_answer_chars: int = verify.DEFAULT_MAX_ANSWER_CHARS,
               worker_memory_mb: int | None = DEFAULT_WORKER_MEMORY_MB,
               after_think: bool = True):
    if num_workers < 1:
      raise ValueError(f"Grader num_workers must be >= 1, got {num_workers}")
    if not timeout_s > 0:
      raise ValueError(f"Grader timeout_s must be > 0, got {timeout_s}")
    if max_chars < 1 or max_answer_chars < 1:
      raise ValueError(f"Grader max_chars and max_answer_chars must be >= 1, got {max_chars}, "
                       f"{max_answer_chars}")
    self.num_workers = num_workers
    self.timeout_s = timeout_s
    self.max_chars = max_chars
    self.max_answer_chars = max_answer_chars
    self.worker_memory_mb = worker_memory_mb
    self.after_think = bool(after_think)
    self.owner_pid = os.getpid()
    self.workers_replaced = 0
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()

  # -- lifecycle --
  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass

  def close(self):
    workers, self._workers = self._workers, []
    for worker in workers:
      worker.ask_to_exit()
    for worker in workers:
      worker.close()

  def _ensure_started(self):
    while len(self._workers) < self.num_workers:
      self._workers.append(_Worker(self.worker_memory_mb))

  def _replace(self, worker: _Worker):
    worker.kill()
    self._workers.remove(worker)
    self._workers.append(_Worker(self.worker_memory_mb))
    self.workers_replaced += 1

  # -- grading --
  def grade(self, texts: Sequence[str], golds: Sequence,
            timeout_s: float | None = None) -> GradeResult:
    """Grade a batch of responses against their gold answers (one gold per response: a string, or
    a list/tuple of acceptable strings, correct when the answer equals any of them)."""
    if len(texts) != len(golds):
      raise ValueError(f"grade: {len(texts)} texts but {len(golds)} golds")
    n = len(texts)
    correct = np.zeros(n, np.bool_)
    timed_out = np.zeros(n, np.bool_)
    truncated_input = np.zeros(n, np.bool_)
    too_long = np.zeros(n, np.bool_)
    failed = np.zeros(n, np.bool_)
    fast_path = np.zeros(n, np.bool_)
    unclosed_think = np.zeros(n, np.bool_)
    extracted: list = [None] * n
    # Distinct (answer, gold) pairs that need math-verify -> the responses sharing them.
    pending: dict[tuple[str, str], list[int]] = {}
    for i, (text, gold) in enumerate(zip(texts, golds)):
      gold_options = verify.gold_options(gold, i)
      region = verify.answer_region(text, self.after_think)
      if region is None:
        unclosed_think[i] = True
        continue
      truncated_input[i] = len(region) > self.max_chars
      answer = verify.extract_answer(region, self.max_chars, after_think=False)
      extracted[i] = answer
      if answer is None:
        continue
      if len(answer) > self.max_answer_chars:
        too_long[i] = True
        continue
      correct[i], undecided = verify.fast_verdicts(verify.normalize(answer), gold_options)
      if correct[i] or not undecided:
        fast_path[i] = True
        continue
      for pair in undecided:
        pending.setdefault(pair, []).append(i)
    if pending:
      statuses = self._check_all(list(pending), self.timeout_s if timeout_s is None else timeout_s)
      for status, indices in zip(statuses, pending.values()):
        correct[indices] |= status == "equal"
        timed_out[indices] |= status == "timeout"
        failed[indices] |= status == "error"
      # With several golds, one equal is enough: the other checks' failures do not count.
      timed_out &= ~correct
      failed &= ~correct
    return GradeResult(correct, extracted, timed_out, truncated_input, too_long, failed, fast_path,
                       unclosed_think)

  def _check_all(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[str]:
    """Statuses ('equal' | 'unequal' | 'timeout' | 'error') of the pairs, checked by the pool."""
    with self._lock:
      self._ensure_started()
      statuses = [None] * len(pairs)
      next_pair, remaining = 0, len(pairs)
      while remaining:
        now = time.monotonic()
        for worker in list(self._workers):
          if worker.task is not None and now > worker.task[1]:
            statuses[worker.task[0]] = "timeout"  # past the hard limit: kill and replace
            remaining -= 1
            self._replace(worker)
          elif not worker.ready and now - worker.started > _WORKER_START_TIMEOUT_S:
            self.close()
            raise RuntimeError(f"verify: a grader worker did not start within "
                               f"{_WORKER_START_TIMEOUT_S} s (see its stderr above)")
          elif worker.ready and worker.task is None and next_pair < len(pairs):
            answer, gold = pairs[next_pair]
            try:
              worker.tasks.send((next_pair, answer, gold, _SOFT_FRACTION * timeout_s))
            except OSError:  # died while idle; the pair goes to the next ready worker
              self._replace(worker)
              continue
            worker.task = (next_pair, time.monotonic() + timeout_s)
            next_pair += 1
        if not remaining:
          break
        deadlines = [w.task[1] for w in self._workers if w.task is not None]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
        by_connection = {w.replies: w for w in self._workers}
        for connection in multiprocessing.connection.wait(list(by_connection), timeout=wait_s):
          worker = by_connection[connection]
          try:
            message_id, status = connection.recv()
          except (EOFError, OSError):  # the worker died: a C-level crash, or it failed to start
            if not worker.ready:
              self.close()
              raise RuntimeError("verify: a grader worker exited while starting (see its stderr "
                                 "above)")
            if worker.task is not None:
              statuses[worker.task[0]] = "error"
              remaining -= 1
            self._replace(worker)
            continue
          if message_id == "ready":
            worker.ready = True
          elif worker.task is not None and message_id == worker.task[0]:
            statuses[message_id] = status
            remaining -= 1
            worker.task = None
      return statuses

  def is_equivalent(self, answer: str, gold, timeout_s: float | None = None) -> bool:
    """Whether an already extracted answer equals the gold answer (or any of a list of them)."""
    answer = verify.normalize(verify.to_text(answer))
    gold_options = verify.gold_options(gold)
    if not answer or len(answer) > self.max_answer_chars:
      return False
    verdict, undecided = verify.fast_verdicts(answer, gold_options)
    if verdict or not undecided:
      return verdict
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    return "equal" in self._check_all(undecided, timeout_s)


# ------------------------------------------------------------------------------------------------
# One shared pool for `is_equivalent` / `grade` (started on first use, closed at exit; a forked
# child starts its own).

_shared_grader: Grader | None = None
_shared_lock = threading.Lock()


def shared() -> Grader:
  """The process's shared `Grader` with default settings."""
  global _shared_grader
  with _shared_lock:
    if _shared_grader is None or _shared_grader.owner_pid != os.getpid():
      _shared_grader = Grader()
      atexit.register(_shared_grader.close)
    return _shared_grader


def is_equivalent(answer: str, gold, timeout_s: float = 5.0) -> bool:
  """Whether an extracted answer equals the gold answer (or one of a list of them): math-verify
  in the shared pool, with a hard time limit."""
  return shared().is_equivalent(answer, gold, timeout_s=timeout_s)


def grade(texts: Sequence[str], golds: Sequence, timeout_s: float = 5.0) -> GradeResult:
  """`Grader.grade` with the shared pool."""
  return shared().grade(texts, golds, timeout_s=timeout_s)
