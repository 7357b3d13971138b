"""Remote paths (gs://, ...): copied once into a per-host local cache, read from there.

The readers here need local files (safetensors memory-maps its files, tokenizers and the data
loaders open paths), so `init_from`, `tokenizer.path` and data paths may be URLs that `localize`
turns into local copies. The copy goes through fsspec (gcsfs for gs://, the `tpu` extra), into
`<cache_dir>/<scheme>/<hash of the URL>/<basename>`: the basename is kept, so a `.model` or
`.jsonl` file keeps its extension. Each host copies for itself (TPU VM workers do not share a
local disk).

A copy is written into a temporary sibling and renamed into place as its last step, so a cache
entry that exists is complete; an interrupted copy leaves only a temporary directory, which a
later call on the same host removes. A URL is assumed to name content that does not change (a
checkpoint, a data set): a cached entry is used without asking the remote again; delete the
entry (or use a new URL) to fetch changed content.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import socket
import tempfile

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL_SCHEMES = ("file", "local")
INSTALL_HINT = "pip install -e '.[tpu]' (it brings gcsfs for gs://)"


class RemotePathError(OSError):
  """A remote path that cannot be read or copied; the message names the URL."""


def is_remote(path: str) -> bool:
  """True for a URL with a scheme other than file:// (gs://bucket/x, memory://x, ...)."""
  m = _URL.match(str(path))
  return bool(m) and m.group(1).lower() not in _LOCAL_SCHEMES


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "opsd_jax")


def cache_path(url: str, cache_dir: str = "") -> str:
  """Where `localize(url, cache_dir)` puts its copy (whether or not it is there yet)."""
  scheme, rest = url.split("://", 1)
  rest = rest.rstrip("/")
  key = hashlib.sha256(f"{scheme.lower()}://{rest}".encode()).hexdigest()[:16]
  base = re.sub(r"[^-_.a-zA-Z0-9]", "_", rest.rsplit("/", 1)[-1]).strip(".") or "root"
  return os.path.join(os.path.expanduser(cache_dir) or default_cache_dir(), scheme.lower(), key,
                      base)


def localize(path: str, cache_dir: str = "") -> str:
  """A local path with the content of `path`: local paths come back unchanged (file:// loses
  its scheme); a remote file or directory is copied once into the cache (cache_dir "" =
  ~/.cache/opsd_jax) and the copy's path is returned, later calls return it without a copy.
  """
  path = str(path)
  if not is_remote(path):
    m = _URL.match(path)
    return path[len(m.group(0)):] if m else path
  target = cache_path(path, cache_dir)
  entry = os.path.dirname(target)
  if os.path.isdir(entry):  # renamed into place only when complete
    return target
  fs, root = _filesystem(path)
  files = _listing(fs, root, path)  # (remote name, path relative to target, size)
  parent = os.path.dirname(entry)
  os.makedirs(parent, exist_ok=True)
  _remove_stale(entry)
  tmp = tempfile.mkdtemp(prefix=_tmp_prefix(entry), dir=parent)
  try:
    local_root = os.path.join(tmp, os.path.basename(target))
    for name, rel, size in files:
      local = os.path.join(local_root, rel) if rel else local_root
      os.makedirs(os.path.dirname(local), exist_ok=True)
      try:
        fs.get_file(name, local)
      except FileNotFoundError:
        raise RemotePathError(f"{path}: {name} disappeared while copying") from None
      except Exception as e:  # backends raise their own types (auth, network)
        raise RemotePathError(f"{path}: copying {name} failed: {e}") from e
      if size is not None and os.path.getsize(local) != size:
        raise RemotePathError(f"{path}: copy of {name} has {os.path.getsize(local)} bytes, the "
                              f"remote has {size}")
    try:
      os.rename(tmp, entry)
    except OSError:
      if not os.path.isdir(entry):  # not another process finishing the same copy first
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def _filesystem(url):
  scheme = _URL.match(url).group(1)
  try:
    import fsspec
  except ImportError:
    raise RemotePathError(f"{url}: reading {scheme}:// paths needs fsspec: "
                          f"{INSTALL_HINT}") from None
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    raise RemotePathError(f"{url}: the {scheme}:// filesystem is not installed ({e}): "
                          f"{INSTALL_HINT}") from None
  except ValueError as e:
    raise RemotePathError(f"{url}: {e}") from None


def _listing(fs, root, url):
  """[(remote name, relative local path, size)]: one entry with rel "" for a file."""
  try:
    info = fs.info(root)
  except FileNotFoundError:
    raise RemotePathError(f"{url}: not found") from None
  except Exception as e:
    raise RemotePathError(f"{url}: cannot read ({e})") from e
  if info.get("type") != "directory":
    return [(root, "", info.get("size"))]
  root = root.rstrip("/")
  files = []
  for name, detail in sorted(fs.find(root, withdirs=False, detail=True).items()):
    if not name.startswith(root + "/") or name.endswith("/"):
      continue  # a directory placeholder object
    rel = name[len(root) + 1:]
    if any(part in ("", ".", "..") for part in rel.split("/")):
      raise RemotePathError(f"{url}: object name {name!r} cannot be a local path")
    files.append((name, rel, detail.get("size")))
  if not files:
    raise RemotePathError(f"{url}: an empty directory")
  return files


def _tmp_prefix(entry):
  parent, key = os.path.split(entry)
  return f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale(entry):
  """Removes the temporary copies of `entry` left by dead processes of this host."""
  parent, key = os.path.split(entry)
  prefix = f".{key}.tmp-{socket.gethostname()}-"
  for tmp in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
    pid = os.path.basename(tmp)[len(prefix):].split("-", 1)[0]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
