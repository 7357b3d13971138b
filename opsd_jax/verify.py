"""Answer extraction and equivalence checking: the one grader for RLVR rewards and evaluation.

Model text is untrusted input. It is never executed; it is only matched with regexes, parsed with
`fractions.Fraction` on the fast path, or parsed by math-verify (LaTeX -> SymPy) inside worker
processes that are killed when a check runs past its hard wall-clock limit.

Why worker processes: math-verify's own timeout uses SIGALRM, which silently does nothing useful
outside the main thread (other frameworks then reward 0 for everything), and cannot interrupt
C-level work such as a huge integer power. A killable process bounds every check.

Verdict policy (tests/data/equivalence_cases.jsonl documents each case):
- reasoning models (Qwen3) think inside `<think>...</think>` and answer after it, so by default
  (`after_think`) only the text after the LAST `</think>` is read: a box inside the thought is a
  draft; a `<think>` still open at the end (cut off, or never finished thinking) -> no answer; a
  response without think tags (thinking-off models, the toy) is read whole.
- the answer is the LAST `\\boxed{...}` / `\\fbox{...}` (brace-matched); no box -> the last `#### N`
  (GSM8K); neither, an empty box or an unterminated last box -> no answer -> incorrect.
- a gold answer is a string or a list of acceptable strings (correct if equal to any).
- equivalence is math-verify's (`parse` both sides, `verify(gold, answer)`), with two repairs:
  digit groups separated by thin spaces (`1\\,000`, `1 000`) are joined first, since math-verify
  reads them as the product 1*000 = 0; and a sentence's final period after a number (`5.`) is
  dropped, since math-verify cannot parse it.
- answers of plain integers / decimals / simple fractions on both sides are decided in the parent
  (exact rational arithmetic) when the verdict is certain to equal math-verify's; otherwise the
  check goes to a worker.
- a timed-out, crashed or over-long check is incorrect and counted.
"""
from __future__ import annotations

import atexit
import dataclasses
import fractions
import logging
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

import numpy as np

# Only the tail of a response is searched for the answer: the final answer sits at the end, and
# this bounds the work per response whatever the model emits.
DEFAULT_MAX_CHARS = 10_000
# An extracted answer longer than this is graded incorrect without parsing (and counted).
DEFAULT_MAX_ANSWER_CHARS = 1_000
# Address-space cap per worker, so one pathological parse cannot take the host's memory.
DEFAULT_WORKER_MEMORY_MB = 4096
# The soft limit (SIGALRM inside the worker, which then survives) as a fraction of the hard one.
_SOFT_FRACTION = 0.9
_WORKER_START_TIMEOUT_S = 120.0

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _to_text(text) -> str:
  """str with any invalid UTF-8 or lone surrogates replaced by U+FFFD (never raises)."""
  if isinstance(text, (bytes, bytearray)):
    return bytes(text).decode("utf-8", errors="replace")
  if not isinstance(text, str):
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def _matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` closing the `{` at open_index; backslash escapes (`\\{`) are skipped."""
  depth = 0
  for token in _BRACE_TOKEN.finditer(text, open_index):
    symbol = token.group()
    if symbol == "{":
      depth += 1
    elif symbol == "}":
      depth -= 1
      if depth == 0:
        return token.start()
  return None


def answer_region(text: str, after_think: bool = True) -> str | None:
  """The part of a response that holds its final answer (None: it has none).

  With `after_think` (Qwen3's own evaluation): the text after the last `</think>`; None when a
  `<think>` is open at the end (the response was cut off or never finished thinking, so anything
  boxed is a draft); the whole text when there are no think tags (thinking-off models, the toy).
  Without it: the whole text. The tags are searched in the whole response, not only its tail, so
  a long thought cannot hide its opening tag.
  """
  text = _to_text(text)
  if not after_think:
    return text
  close = text.rfind(THINK_CLOSE)
  start = 0 if close < 0 else close + len(THINK_CLOSE)
  if text.find(THINK_OPEN, start) >= 0:
    return None
  return text[start:]


def extract_answer(text: str, max_chars: int = DEFAULT_MAX_CHARS,
                   after_think: bool = True) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed {...}`), brace-matched,
  in the response's `answer_region` (after the last `</think>` by default).

  Falls back to the last `#### N` line (GSM8K) only when the region has no box at all. Returns None
  when there is no answer region or answer, the answer is empty, or the last box is unterminated (a
  response cut off inside its final box has no final answer; an earlier box is a draft, not the
  answer). Only the last `max_chars` characters of the region are searched.
  """
  text = answer_region(text, after_think)
  if text is None:
    return None
  if len(text) > max_chars:
    text = text[-max_chars:]
  last_box = None
  for last_box in _BOX_OPEN.finditer(text):
    pass
  if last_box is not None:
    open_index = last_box.end() - 1
    close_index = _matching_brace(text, open_index)
    if close_index is None:
      return None
    answer = text[open_index + 1:close_index].strip()
    return answer or None
  last_hashes = None
  for last_hashes in _GSM8K_ANSWER.finditer(text):
    pass
  if last_hashes is None:
    return None
  answer = last_hashes.group(1).strip().rstrip(".").strip()
  return answer or None


# ------------------------------------------------------------------------------------------------
# Normalisation shared by the fast path and the workers.

# 1\,000 / 1\ 000 / 1~000 / "1 000": digit groups joined by a (thin) space.
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,;: !]|~| )\d{3})+(?![\d.])")
_GROUP_SEPARATOR = re.compile(r"\\[,;: !]|~| ")


_TRAILING_PERIOD = re.compile(r"(?<=[0-9])\.$")


def _normalize(answer: str) -> str:
  """Repairs for forms math-verify misreads: `1\\,000` (as 1*000) and a final period (`5.`)."""
  answer = _TRAILING_PERIOD.sub("", answer.strip())
  return _SPACED_THOUSANDS.sub(lambda m: _GROUP_SEPARATOR.sub("", m.group()), answer)


# ------------------------------------------------------------------------------------------------
# Fast path: plain integers, decimals and simple fractions, ASCII digits only (a fullwidth or
# Arabic-Indic digit is not a number to math-verify either).

_INT = r"-?[0-9]+"
_DECIMAL = r"-?[0-9]+\.[0-9]+"
_SLASH_FRACTION = re.compile(r"(-?[0-9]+)/([0-9]+)", re.ASCII)
_LATEX_FRACTION = re.compile(r"(-?)\\d?frac\{(-?[0-9]+)\}\{([0-9]+)\}", re.ASCII)
_PLAIN_NUMBER = re.compile(rf"{_DECIMAL}|{_INT}", re.ASCII)
# Limits within which math-verify's parse is exact: a SymPy Float keeps 15 significant digits.
_MAX_INT_DIGITS = 40
_MAX_DECIMAL_DIGITS = 12
# math-verify compares a float to 6 decimal places; a gap wider than this is unequal for sure.
_SURELY_UNEQUAL_GAP = fractions.Fraction(1, 10**5)


def _simple_number(answer: str) -> tuple[fractions.Fraction, bool] | None:
  """(value, is_decimal) for `12`, `-3.25`, `7/8`, `\\frac{7}{8}`, `-\\dfrac{1}{2}`; else None."""
  if len(answer) > _MAX_INT_DIGITS + 2:
    return None
  if _PLAIN_NUMBER.fullmatch(answer):
    digits = sum(c.isdigit() for c in answer)
    is_decimal = "." in answer
    if is_decimal and digits > _MAX_DECIMAL_DIGITS:
      return None
    return fractions.Fraction(answer), is_decimal
  match = _SLASH_FRACTION.fullmatch(answer)
  sign = ""
  if match is None:
    match = _LATEX_FRACTION.fullmatch(answer)
    if match is None:
      return None
    sign, numerator, denominator = match.groups()
  else:
    numerator, denominator = match.groups()
  if int(denominator) == 0:
    return None  # math-verify's complex infinity; let it decide
  value = fractions.Fraction(int(numerator), int(denominator))
  return (-value if sign else value), False


def _fast_verdict(answer: str, gold: str) -> bool | None:
  """math-verify's verdict where it is certain from exact arithmetic, else None (ask a worker)."""
  parsed_answer, parsed_gold = _simple_number(answer), _simple_number(gold)
  if parsed_answer is None or parsed_gold is None:
    return None
  (a, a_decimal), (g, g_decimal) = parsed_answer, parsed_gold
  if a == g:
    return True
  if not (a_decimal or g_decimal):
    return False  # integers and rationals compare exactly in math-verify
  if abs(a - g) > _SURELY_UNEQUAL_GAP:
    for side, is_decimal in ((answer, a_decimal), (gold, g_decimal)):
      if not is_decimal and sum(c.isdigit() for c in side) > _MAX_DECIMAL_DIGITS:
        return None  # compared as a 15-digit float by math-verify: not certain
    return False
  return None


# ------------------------------------------------------------------------------------------------
# Worker process.

class _SoftTimeout(BaseException):
  """Raised by SIGALRM inside a worker; BaseException so library `except Exception` cannot eat it."""


def _raise_soft_timeout(signum, frame):
  raise _SoftTimeout()


def _math_verify_equal(answer: str, gold: str) -> bool:
  import math_verify  # imported in workers (and preloaded in the forkserver), not in the parent
  # The workers bound the time themselves (SIGALRM + kill), so math-verify's own alarms are off.
  parsed_gold = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=None)
  parsed_answer = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=None)
  if not parsed_gold or not parsed_answer:
    return False
  return bool(math_verify.verify(parsed_gold, parsed_answer, timeout_seconds=None))


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
  _math_verify_equal("1", "1")  # import and warm up SymPy before announcing readiness
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
        status = "equal" if _math_verify_equal(answer, gold) else "unequal"
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
_WORKER_COMMAND = ("import sys; from opsd_jax.verify import _worker_main; "
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
  after the last `</think>` (see `answer_region`; False: the whole response).
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
               max_chars: int = DEFAULT_MAX_CHARS,
               max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
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
      gold_options = _gold_options(gold, i)
      region = answer_region(text, self.after_think)
      if region is None:
        unclosed_think[i] = True
        continue
      truncated_input[i] = len(region) > self.max_chars
      answer = extract_answer(region, self.max_chars, after_think=False)
      extracted[i] = answer
      if answer is None:
        continue
      if len(answer) > self.max_answer_chars:
        too_long[i] = True
        continue
      correct[i], undecided = _fast_verdicts(_normalize(answer), gold_options)
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
    answer = _normalize(_to_text(answer))
    gold_options = _gold_options(gold)
    if not answer or len(answer) > self.max_answer_chars:
      return False
    verdict, undecided = _fast_verdicts(answer, gold_options)
    if verdict or not undecided:
      return verdict
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    return "equal" in self._check_all(undecided, timeout_s)


def _gold_options(gold, index: int | None = None) -> list[str]:
  """The normalised acceptable answers of one gold: a string, or a non-empty list/tuple of them."""
  if isinstance(gold, (list, tuple)):
    if not gold:
      where = "" if index is None else f" of response {index}"
      raise ValueError(f"grade: the gold answer list{where} is empty")
    return list(dict.fromkeys(_normalize(_to_text(g)) for g in gold))
  return [_normalize(_to_text(gold))]


def _fast_verdicts(answer: str, gold_options: list[str]) -> tuple[bool, list[tuple[str, str]]]:
  """(True, []) when the fast path finds the answer equal to a gold; else (False, the
  (answer, gold) pairs it could not decide, for math-verify)."""
  undecided = []
  for gold in gold_options:
    verdict = _fast_verdict(answer, gold)
    if verdict:
      return True, []
    if verdict is None:
      undecided.append((answer, gold))
  return False, undecided


# ------------------------------------------------------------------------------------------------
# Module-level convenience (one shared pool, started on first use, closed at exit).

_shared_grader: Grader | None = None
_shared_lock = threading.Lock()


def _grader() -> Grader:
  global _shared_grader
  with _shared_lock:
    if _shared_grader is None or _shared_grader.owner_pid != os.getpid():
      _shared_grader = Grader()
      atexit.register(_shared_grader.close)
    return _shared_grader


def is_equivalent(answer: str, gold, timeout_s: float = 5.0) -> bool:
  """Whether an extracted answer equals the gold answer (math-verify, hard time limit)."""
  return _grader().is_equivalent(answer, gold, timeout_s=timeout_s)


def grade(texts: Sequence[str], golds: Sequence, timeout_s: float = 5.0) -> GradeResult:
  """`Grader.grade` with a shared module-level pool."""
  return _grader().grade(texts, golds, timeout_s=timeout_s)
