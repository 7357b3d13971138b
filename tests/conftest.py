"""Test setup: 8 fake CPU devices (mesh tests), float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory):
  """A directory with Qwen3's real tokenizer.json, tokenizer_config.json and
  generation_config.json (tests/real_files.py)."""
  import real_files
  return real_files.qwen3_tokenizer_dir(str(tmp_path_factory.mktemp("qwen3_tokenizer")))
