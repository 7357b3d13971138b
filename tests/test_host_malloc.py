"""host_malloc: after it, a second execution of a program with a large temporary reuses the
pages of the first (no page faults); without it, or called too late, every execution faults its
temporary in again. Each case runs in a fresh interpreter: the setting binds at JAX's start."""
import json
import os
import subprocess
import sys

import pytest

from opsd_jax import host_malloc

# A 256 MiB dot output (a temporary: the next dot consumes it), executed three times; minor page
# faults of the third execution. 256 MiB is 65,536 pages of 4 KiB.
_PROGRAM = """
import json, resource, sys
from opsd_jax import host_malloc
applied = host_malloc.configure_from_env() if sys.argv[1] != "late" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: ((a @ b) @ b.T).sum())
a, b = jnp.ones((8192, 64)), jnp.ones((64, 8192))
if sys.argv[1] == "late":
  applied = host_malloc.reuse_host_temporaries()
f(a, b).block_until_ready(); f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(a, b).block_until_ready()
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(when, choice="reuse"):
  """when: "early" (configure_from_env before JAX starts, with $OPSD_JAX_HOST_MALLOC=choice) or
  "late" (reuse_host_temporaries after JAX has run)."""
  env = {k: v for k, v in os.environ.items() if k != host_malloc.ENV} | {"JAX_PLATFORMS": "cpu"}
  if choice is not None:
    env[host_malloc.ENV] = choice
  out = subprocess.run([sys.executable, "-c", _PROGRAM, when], capture_output=True, text=True,
                       check=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_malloc._glibc() is None,
                    reason="glibc malloc only")
def test_temporaries_reuse_their_pages_only_when_set_before_jax_starts():
  early, late, unset = _run("early"), _run("late"), _run("early", choice=None)
  assert early["applied"] is True and late["applied"] is False and unset["applied"] is False
  assert unset["faults"] > 30_000 and late["faults"] > 30_000, (unset, late)
  assert early["faults"] < 3_000, early


@pytest.mark.parametrize("platforms, accelerator, expected", [
    ("cpu", True, True), ("cpu,cpu", False, True), ("tpu", False, False),
    ("cuda,cpu", False, False), (None, False, True), (None, True, False), ("", True, False)])
def test_only_when_xla_cpu_computes(platforms, accelerator, expected):
  assert host_malloc.computes_on_cpu(platforms, accelerator) is expected


def test_the_cli_reuses_only_when_asked_and_a_bad_choice_is_named(monkeypatch):
  monkeypatch.delenv(host_malloc.ENV, raising=False)
  assert host_malloc.configure_from_env() is False
  monkeypatch.setenv(host_malloc.ENV, "system")
  assert host_malloc.configure_from_env() is False
  monkeypatch.setenv(host_malloc.ENV, "jemalloc")
  with pytest.raises(ValueError, match="OPSD_JAX_HOST_MALLOC='jemalloc'"):
    host_malloc.configure_from_env()
