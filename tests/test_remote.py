"""remote.localize over fsspec's in-memory filesystem (a real fsspec backend, the code path gs://
takes through gcsfs): a Hugging Face-style directory and a JSONL file copied once, atomically."""
import json
import os
import subprocess
import sys
import time

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from opsd_jax import remote

HF_DIR = {"config.json": b'{"model_type": "qwen3"}',
          "model-00001-of-00002.safetensors": os.urandom(3000),
          "model-00002-of-00002.safetensors": os.urandom(5000),
          "model.safetensors.index.json": b'{"weight_map": {}}',
          "tokenizer.json": b'{"model": {}}',
          "nested/chat_template.jinja": b"{{ messages }}"}
ROWS = [{"question": "1+1?", "answer": "2"}, {"question": "2+3?", "answer": "5"}]


@pytest.fixture
def bucket(request):
  """memory://<test name>/ holding ckpt/ (HF_DIR) and data/train.jsonl; removed afterwards."""
  fs = fsspec.filesystem("memory")
  root = f"/{request.node.name.replace('[', '_').replace(']', '_')}"
  for name, data in HF_DIR.items():
    fs.pipe(f"{root}/ckpt/{name}", data)
  fs.pipe(f"{root}/data/train.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
  yield f"memory:/{root}"
  if fs.exists(root):
    fs.rm(root, recursive=True)


def _tree(directory):
  out = {}
  for dirpath, _, files in os.walk(directory):
    for f in files:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dirpath, f), directory)] = fh.read()
  return out


def test_local_paths_are_returned_unchanged(tmp_path):
  assert not remote.is_remote("/data/x.jsonl") and not remote.is_remote("rel/dir")
  assert not remote.is_remote("file:///data/x") and remote.is_remote("gs://b/x")
  assert remote.is_remote("memory://x")
  assert remote.localize("rel/dir", str(tmp_path)) == "rel/dir"
  assert remote.localize("file:///data/x.jsonl", str(tmp_path)) == "/data/x.jsonl"
  assert os.listdir(tmp_path) == []


def test_directory_and_file_copied_once(bucket, tmp_path):
  cache = str(tmp_path / "cache")
  local = remote.localize(f"{bucket}/ckpt/", cache)  # a trailing slash names the same entry
  assert local == remote.cache_path(f"{bucket}/ckpt", cache)
  assert local.startswith(os.path.join(cache, "memory") + os.sep)
  assert os.path.basename(local) == "ckpt" and _tree(local) == HF_DIR
  data = remote.localize(f"{bucket}/data/train.jsonl", cache)
  assert data.endswith(os.sep + "train.jsonl") and os.path.isfile(data)
  with open(data) as f:
    assert [json.loads(line) for line in f] == ROWS
  mtimes = {p: os.stat(os.path.join(local, p)).st_mtime_ns for p in HF_DIR}
  # Second call: served from the cache without reading the remote (it is gone now).
  fsspec.filesystem("memory").rm(bucket[len("memory:/"):], recursive=True)
  assert remote.localize(f"{bucket}/ckpt", cache) == local
  assert remote.localize(f"{bucket}/data/train.jsonl", cache) == data
  assert {p: os.stat(os.path.join(local, p)).st_mtime_ns for p in HF_DIR} == mtimes
  # Nothing but the two entries in the cache (no temporary directories left).
  entries = [os.path.join(d, e) for d in os.listdir(os.path.join(cache, "memory"))
             for e in os.listdir(os.path.join(cache, "memory", d))]
  assert len(entries) == 2 and not any(os.path.basename(e).startswith(".") for e in entries)


def test_default_cache_dir_is_under_home(bucket, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  local = remote.localize(f"{bucket}/data/train.jsonl", "")
  assert local.startswith(str(tmp_path / ".cache" / "opsd_jax" / "memory"))


def test_missing_url_is_named(bucket, tmp_path):
  with pytest.raises(remote.RemotePathError, match=f"^{bucket}/nope: not found$"):
    remote.localize(f"{bucket}/nope", str(tmp_path))
  assert not os.path.exists(tmp_path / "memory") or not _tree(tmp_path)


def test_gs_without_gcsfs_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on a machine without the tpu extra
  with pytest.raises(remote.RemotePathError) as info:
    remote.localize("gs://some-bucket/qwen3-8b", str(tmp_path))
  assert str(info.value).startswith("gs://some-bucket/qwen3-8b: the gs:// filesystem is not "
                                    "installed")
  assert "pip install -e '.[tpu]'" in str(info.value)


class FailingMemory(MemoryFileSystem):
  """memory:// whose copy fails on the n-th file, as a dropped connection would."""
  protocol = "failmem"
  fail_at = 3
  copied = 0

  @classmethod
  def _strip_protocol(cls, path):
    if path.startswith("failmem://"):
      path = "memory://" + path[len("failmem://"):]
    return super()._strip_protocol(path)

  def get_file(self, rpath, lpath, **kwargs):
    type(self).copied += 1
    if type(self).copied == type(self).fail_at:
      with open(lpath, "wb") as f:
        f.write(b"half")
      raise ConnectionError("connection reset")
    return super().get_file(rpath, lpath, **kwargs)


def test_interrupted_copy_leaves_no_complete_looking_entry(bucket, tmp_path):
  fsspec.register_implementation("failmem", FailingMemory, clobber=True)
  FailingMemory.fail_at, FailingMemory.copied = 3, 0
  url = "failmem://" + bucket[len("memory://"):] + "/ckpt"
  cache = str(tmp_path)
  with pytest.raises(remote.RemotePathError, match="copying .* failed: connection reset"):
    remote.localize(url, cache)
  target = remote.cache_path(url, cache)
  assert not os.path.exists(os.path.dirname(target))
  assert os.listdir(os.path.dirname(os.path.dirname(target))) == []  # the partial copy is gone
  FailingMemory.fail_at = -1
  assert _tree(remote.localize(url, cache)) == HF_DIR


def test_copy_left_by_a_killed_process_is_removed(bucket, tmp_path):
  url = f"{bucket}/ckpt"
  entry = os.path.dirname(remote.cache_path(url, str(tmp_path)))
  dead = subprocess.Popen(["true"])
  dead.wait()
  prefix = os.path.basename(remote._tmp_prefix(entry)).replace(f"-{os.getpid()}-",
                                                               f"-{dead.pid}-")
  stale = os.path.join(os.path.dirname(entry), prefix + "abc", "ckpt")
  os.makedirs(stale)
  with open(os.path.join(stale, "config.json"), "wb") as f:
    f.write(b"{")  # what a SIGKILL mid-copy leaves
  local = remote.localize(url, str(tmp_path))
  assert _tree(local) == HF_DIR
  assert os.listdir(os.path.dirname(entry)) == [os.path.basename(entry)]


RACE = """
import os, sys, time, fsspec
from opsd_jax import remote
fs = fsspec.filesystem("memory")  # this process's own store
for i in range(20):
  fs.pipe(f"/race/ckpt/f{i}.bin", bytes([i]) * 200_000)
cache, me = sys.argv[1], sys.argv[2]
open(os.path.join(cache, "..", "ready-" + me), "w").close()
while not os.path.exists(os.path.join(cache, "..", "go")):
  time.sleep(0.001)
print(remote.localize("memory://race/ckpt", cache))
"""


def test_processes_copying_one_url_at_once_agree(tmp_path):
  """Processes of one host (or hosts sharing a cache disk) racing on one entry: one rename wins,
  the others drop their copies and return the same path."""
  cache = tmp_path / "cache"
  cache.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", RACE, str(cache), str(i)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
  try:
    while len(list(tmp_path.glob("ready-*"))) < 4:
      assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
      time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0] * 4, outs
  paths = {out.strip() for out, _ in outs}
  assert paths == {remote.cache_path("memory://race/ckpt", str(cache))}
  local = paths.pop()
  assert _tree(local) == {f"f{i}.bin": bytes([i]) * 200_000 for i in range(20)}
  entry = os.path.dirname(local)
  assert os.listdir(os.path.dirname(entry)) == [os.path.basename(entry)]  # no copies left over
