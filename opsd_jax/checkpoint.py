"""Train-state checkpoints with orbax: one directory per step, the last N kept, atomic.

A checkpoint holds three items:
  state  the array pytree (params, optimizer state, step, rng keys, ...), via StandardSave;
  extra  a JSON dict of everything else needed to resume (data-iterator state, metrics so far);
  meta   our own bookkeeping: where the typed PRNG keys sit (orbax stores their raw key_data).
Orbax writes a step into a temporary directory and renames it when complete, so a save that dies
half-way leaves no step behind that `latest_step` or `restore` would pick up.

Restoring onto a different mesh: pass `target` (the state's structure, e.g. `jax.eval_shape` of
the init, with shardings) and/or `target_shardings`; each array is read straight into its new
shards.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_STATE, _EXTRA, _META = "state", "extra", "meta"


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, incomplete or does not match what is asked of it."""


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_paths(tree) -> dict[str, str]:
  """keystr(path) -> PRNG impl name, for every typed-key leaf."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_key(leaf):
      found[jax.tree_util.keystr(path)] = str(jax.random.key_impl(leaf))
  return found


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _registry():
  """Handlers named up front, so a fresh process can read metadata before any restore."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add(_STATE, args, ocp.handlers.StandardCheckpointHandler)
  for item in (_EXTRA, _META):
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(item, args, ocp.handlers.JsonCheckpointHandler)
  return registry


class Checkpointer:
  """Saves and restores train states under `directory` (one sub-directory per step).

  keep: how many of the latest steps to keep (older ones are deleted after a save).
  async_save: return from `save` once the arrays are copied off the devices and write in the
  background; call `wait()` (or `close()`) before relying on the files.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = False):
    if keep < 1:
      raise CheckpointError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        handler_registry=_registry())

  def save(self, step: int, state, extra: dict[str, Any] | None = None) -> None:
    """Saves `state` (a pytree of arrays; typed PRNG keys allowed) and the JSON dict `extra`."""
    extra = {} if extra is None else extra
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"checkpoint extra state is not JSON-serialisable: {e}") from e
    meta = {"keys": _key_paths(state)}
    self._manager.save(int(step), args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_keys_to_data(state)),
        _EXTRA: ocp.args.JsonSave(extra),
        _META: ocp.args.JsonSave(meta)}), force=True)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int | None = None, target=None, target_shardings=None):
    """Returns (state, extra) of `step` (default: the latest).

    target: optional pytree with the saved state's structure (arrays or ShapeDtypeStructs,
      typed keys allowed); gives containers their types (e.g. optax NamedTuples) and, where its
      leaves carry shardings, where each array goes.
    target_shardings: one Sharding for every array, or a pytree of them matching the state;
      overrides the target's shardings. Without either, arrays land on the first device.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint under {self.directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} under {self.directory} "
                            f"(available: {steps})")
    where = os.path.join(self.directory, str(step))
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          **{_META: ocp.args.JsonRestore()}))[_META]
      saved = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # orbax raises many kinds; all mean the same to a user
      raise CheckpointError(f"checkpoint {where} is unreadable or incomplete: "
                            f"{type(e).__name__}: {e}") from e
    if saved is None:
      raise CheckpointError(f"checkpoint {where} has no readable '{_STATE}' item")
    abstract = _abstract_state(saved, target, target_shardings, where)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract), _EXTRA: ocp.args.JsonRestore()}))
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} could not be restored onto the requested "
                            f"target: {type(e).__name__}: {e}") from e
    state = _wrap_keys(restored[_STATE], meta.get("keys", {}))
    return state, restored[_EXTRA] or {}

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _abstract_state(saved, target, target_shardings, where):
  """ShapeDtypeStructs (with shardings) for StandardRestore."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  structure = saved if target is None else _keys_to_data_abstract(target)
  if target_shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(
        getattr(x, "sharding", None), jax.sharding.Sharding) else default, structure)
  elif isinstance(target_shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: target_shardings, structure)
  else:
    shardings = target_shardings
  try:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        structure, shardings)
  except ValueError as e:
    raise CheckpointError(f"checkpoint {where}: target_shardings does not match the state's "
                          f"structure: {e}") from e


def _keys_to_data_abstract(target):
  def convert(x):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return x
  return jax.tree.map(convert, target)


def _wrap_keys(state, key_paths):
  if not key_paths:
    return state
  def wrap(path, leaf):
    impl = key_paths.get(jax.tree_util.keystr(path))
    return leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)
  return jax.tree_util.tree_map_with_path(wrap, state)


# --------------------------------------------------------------------------------------------
# One-call helpers
# --------------------------------------------------------------------------------------------


def save(directory: str, step: int, state, extra: dict[str, Any] | None = None,
         keep: int = 3) -> None:
  with Checkpointer(directory, keep=keep) as ckpt:
    ckpt.save(step, state, extra)


def latest_step(directory: str) -> int | None:
  """The newest complete step under `directory`, or None (also when it does not exist)."""
  if not os.path.isdir(directory):
    return None
  with Checkpointer(directory) as ckpt:
    return ckpt.latest_step()


def restore(directory: str, step: int | None = None, target=None, target_shardings=None):
  """(state, extra) of `step` (default: latest) under `directory`; see Checkpointer.restore."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory {directory}")
  with Checkpointer(directory) as ckpt:
    return ckpt.restore(step, target=target, target_shardings=target_shardings)


# --------------------------------------------------------------------------------------------
# A bare parameter snapshot (a stage's final parameters), not a step series
# --------------------------------------------------------------------------------------------


def save_params(directory: str, params) -> None:
  """Writes `params` to `directory` atomically (replacing an older snapshot there)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory, params, force=True)


def exists(directory: str) -> bool:
  """Whether `directory` holds a complete snapshot (orbax renames it into place when done)."""
  return os.path.isdir(directory) and bool(os.listdir(directory))


def load_params(directory: str, shardings=None):
  """Reads a snapshot of `save_params`; `shardings` (a pytree like the params, or one Sharding)
  places each array, default: the first device."""
  directory = os.path.abspath(directory)
  if not exists(directory):
    raise CheckpointError(f"no parameter snapshot at {directory}")
  with ocp.StandardCheckpointer() as ckpt:
    try:
      saved = ckpt.metadata(directory).item_metadata
      saved = getattr(saved, "tree", saved)  # a TreeMetadata wrapper around the plain tree
      abstract = _abstract_state(saved, None, shardings, directory)
      return ckpt.restore(directory, abstract)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"parameter snapshot {directory} is unreadable or does not match: "
                            f"{type(e).__name__}: {e}") from e
