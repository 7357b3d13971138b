"""Keeps XLA:CPU's per-execution temporaries in memory that stays mapped between executions.

XLA:CPU allocates each execution's temporaries as one block (2 GB for the train step of
bench/train_step.py) with malloc, from the worker thread that runs it, and frees it at the end.
glibc serves blocks that big with a fresh mmap and returns them with munmap, so every step
page-faults its whole working set in again (the kernel zeroing every page) and unmaps it after,
a large share of the step in system time. Served from the main heap, never trimmed, the next step
reuses the same, already-mapped pages (`python3 bench/train_step.py --malloc reuse|system`
measures both; docs/benchmarks.md has the figures). PyTorch's CPU tuning guides recommend jemalloc
or tcmalloc for the same reason.

The costs: other allocations split a freed block now and then, and the heap grows by a block
early in a run, then stays flat, so the process holds about two blocks more than with glibc's
defaults. And with one arena every thread's malloc takes the same lock, which slows the toy
pipeline (small temporaries, many short executions; docs/benchmarks.md). So it is opt-in:
OPSD_JAX_HOST_MALLOC=reuse for the CLI (`configure_from_env`), on for bench/train_step.py.

The setting is process-wide and binds a thread at its first malloc, so it must be made before JAX
starts its backend (before the first device query or computation). It is skipped where it would
not help: when a TPU or GPU will run the computations, off glibc (macOS), or once a backend has
started.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

from absl import logging

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV = "OPSD_JAX_HOST_MALLOC"  # "system" (glibc's defaults, the default) or "reuse"


def configure_from_env() -> bool:
  """reuse_host_temporaries() when $OPSD_JAX_HOST_MALLOC is "reuse"; glibc's defaults when it is
  "system" or unset. Returns whether the setting was made."""
  choice = os.environ.get(ENV, "system")
  if choice not in ("reuse", "system"):
    raise ValueError(f"${ENV}={choice!r}: expected 'reuse' or 'system'")
  return choice == "reuse" and reuse_host_temporaries()


def reuse_host_temporaries() -> bool:
  """Sets glibc's malloc to serve large blocks from one never-trimmed heap when XLA:CPU will do
  the computing. Returns whether it was set."""
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    logging.info("host_malloc: JAX's backend already started; malloc settings left as they are")
    return False
  if not computes_on_cpu(_config_platforms(), _accelerator_installed()):
    return False
  libc = _glibc()
  if libc is None:
    return False
  # One arena: other threads' heaps fall back to mmap for big blocks whatever M_MMAP_MAX says.
  # -1 is read as the largest size_t: the heap's top is never returned to the OS.
  return all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def computes_on_cpu(platforms: str | None, accelerator_installed: bool) -> bool:
  """Whether XLA:CPU runs the computations: JAX is restricted to "cpu", or left to choose and
  finds no accelerator to choose."""
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  return not accelerator_installed


def _config_platforms() -> str | None:
  import jax
  return jax.config.jax_platforms  # $JAX_PLATFORMS unless set in code


def _accelerator_installed() -> bool:
  """libtpu or a PJRT plugin (CUDA, ROCm, ...) that JAX would load: JAX discovers plugins as
  `jax_plugins` entry points or modules of the `jax_plugins` namespace package."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    return False
  return bool(spec) and any(not name.startswith(("_", "."))
                            for path in spec.submodule_search_locations or []
                            if os.path.isdir(path) for name in os.listdir(path))


def _glibc():
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # only glibc has it (and its mallopt parameters)
  except (OSError, AttributeError, TypeError):
    return None
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return libc
