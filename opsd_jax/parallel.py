"""Device mesh, logical-axis rules and sharded initialisation.

The mesh has three axes, any of which may be 1: `data` (pure data parallel), `fsdp` (data parallel
with parameters sharded over it) and `tensor` (heads / MLP / vocab split). Modules name their axes
logically (`embed`, `heads`, ...); LOGICAL_RULES maps those names onto mesh axes, so changing the
parallelism never touches model code.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> tuple[int, int, int]:
  """Resolves one -1 to "all remaining devices" and checks the product against the devices."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} "
                     f"tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if known > num_devices:
    raise ValueError(f"mesh: data x fsdp x tensor = {known} is larger than the {num_devices} "
                     "available devices")
  if num_devices % known:
    raise ValueError(f"mesh: data x fsdp x tensor = {known} does not divide the {num_devices} "
                     "available devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: data x fsdp x tensor = {math.prod(sizes)} but there are "
                     f"{num_devices} devices (mesh larger or smaller than the devices)")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(jax.devices()) if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  # Auto axes: shardings propagate through jit as with pjit (jax 0.10 defaults to Explicit).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(mesh_cfg) -> jax.sharding.Mesh:
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def logical_to_sharding(boxed_tree, mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of logically-partitioned (boxed) values or their shapes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(cfg, mesh, rules=LOGICAL_RULES):
  """Sharding of every parameter of a model config, from the modules' logical axis names."""
  from opsd_jax import model  # local: parallel is imported by model users, not by model
  return logical_to_sharding(model.abstract_params(cfg), mesh, rules)


def init_params(cfg, rng, mesh, rules=LOGICAL_RULES):
  """Random parameters created directly in their shards (no host copy of the whole model)."""
  from opsd_jax import model
  shardings = param_shardings(cfg, mesh, rules)
  return jax.jit(lambda key: model.init(cfg, key), out_shardings=shardings)(rng)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch, mesh):
  """Places a host batch (pytree of numpy arrays with a leading batch dim) onto the mesh."""
  def put(x):
    x = np.asarray(x)
    return jax.device_put(x, batch_sharding(mesh, max(x.ndim, 1)) if x.ndim else replicated(mesh))
  return jax.tree.map(put, batch)
