"""Device mesh, logical-axis rules and sharded initialisation.

The mesh has three axes, any of which may be 1: `data` (pure data parallel), `fsdp` (data parallel
with parameters sharded over it) and `tensor` (heads / MLP / vocab split). Modules name their axes
logically (`embed`, `heads`, ...); LOGICAL_RULES maps those names onto mesh axes, so changing the
parallelism never touches model code.

Multi-host: `initialize_distributed()` starts JAX's multi-controller runtime (every process runs
the same program on a global mesh). Each process then feeds only its own rows of a batch:
`shard_batch` takes a PROCESS-LOCAL batch and builds the global array from the pieces
(`jax.make_array_from_process_local_data`); in a single process local = global, so callers do not
change. `local_rows` / `process_batch_rows` go the other way, `to_host` gathers a whole array.

Host-side decisions (which groups to keep, when to stop, what to evaluate) must be the same on
every process, or the processes run different programs and hang in a collective. The pipeline
keeps them equal by construction: `gather_rows` gives every process the global list of a batch's
records (each read its own rows), the learner's host batches are global on every process and
`shard_global_batch` feeds this process's rows of them, `broadcast_object` makes process 0's view
of the workdir everyone's, `any_process` turns a local event (SIGTERM) into a global one. Only
process 0 writes the run's files (`is_primary`); orbax checkpoints are written by all.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------

ENV_COORDINATOR = "OPSD_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "OPSD_NUM_PROCESSES"
ENV_PROCESS_ID = "OPSD_PROCESS_ID"


def _cluster_detected() -> bool:
  """True where jax.distributed.initialize() finds its peers alone (TPU VM slice, GKE, Slurm,
  Open MPI). Uses JAX's own detectors; a JAX without them counts as no cluster."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  try:
    from jax._src.clusters import cluster  # private, but it is what initialize() itself runs
    return any(env.is_env_present() for env in cluster.ClusterEnv._cluster_types
               if not env.opt_in_only_method)
  except Exception:  # noqa: BLE001  (API moved: fall back to explicit arguments only)
    return False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, initialization_timeout: int = 300) -> bool:
  """Starts JAX's multi-controller runtime; call once, before anything touches a device.

  Arguments left None come from $OPSD_COORDINATOR ("host:port"), $OPSD_NUM_PROCESSES and
  $OPSD_PROCESS_ID. With none of them set, a cluster JAX recognises (every worker of a TPU VM
  slice, where `gcloud ... ssh --worker=all` starts one process per host) initialises itself; on a
  plain machine the run stays single-process. Returns True when the runtime was initialised
  (also when it already was), False for a single-process run. On CPU, cross-process collectives
  use gloo (jax 0.10's default for jax_cpu_collectives_implementation)."""
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = _env_int(ENV_PROCESS_ID)
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if all(v is None for v in given.values()):
    if not _cluster_detected():
      return False
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  else:
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"initialize_distributed: {', '.join(missing)} missing (give all of "
                       f"coordinator_address, num_processes, process_id, or set ${ENV_COORDINATOR}"
                       f", ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
    if ":" not in coordinator_address:
      raise ValueError(f"initialize_distributed: coordinator_address must be host:port, got "
                       f"{coordinator_address!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"initialize_distributed: need 0 <= process_id < num_processes, got "
                       f"process_id={process_id} num_processes={num_processes}")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout)
  log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _env_int(name: str) -> int:
  try:
    return int(os.environ[name])
  except ValueError:
    raise ValueError(f"${name} must be an integer, got {os.environ[name]!r}") from None


def process_batch_rows(mesh, global_batch_size: int) -> slice:
  """The rows of a global batch this process feeds to `shard_batch` on this mesh (contiguous:
  jax.make_mesh puts each process's devices in one block of the data axes)."""
  sharding = batch_sharding(mesh, 1)
  indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
  starts = [i[0].start or 0 for i in indices]
  stops = [global_batch_size if i[0].stop is None else i[0].stop for i in indices]
  rows = slice(min(starts), max(stops))
  covered = {r for a, b in zip(starts, stops) for r in range(a, b)}
  if len(covered) != rows.stop - rows.start:
    raise ValueError(f"mesh: this process's devices hold non-contiguous batch rows {sorted(covered)}"
                     "; build the mesh with parallel.make_mesh")
  return rows


def shard_batch(batch, mesh):
  """Places a PROCESS-LOCAL host batch (pytree of numpy arrays with a leading batch dim) onto
  the mesh as global arrays: process p gives the rows `process_batch_rows(mesh, B)` of the global
  batch of B rows (in one process: the whole batch). Scalars are replicated (same on all)."""
  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.make_array_from_process_local_data(replicated(mesh), x, ())
    sharding = batch_sharding(mesh, x.ndim)
    global_rows = _global_rows(mesh, x.shape[0])
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))
  return jax.tree.map(put, batch)


def _global_rows(mesh, local_rows: int) -> int:
  """Global batch size from this process's share: its devices hold `held` of the `shards` slices
  of the batch dimension."""
  shards = data_parallel_size(mesh)
  held = len({i[0].start for i in
              batch_sharding(mesh, 1).addressable_devices_indices_map((shards,)).values()})
  if local_rows % held:
    raise ValueError(f"shard_batch: this process's batch has {local_rows} rows, not divisible by "
                     f"the {held} data shards its devices hold (data x fsdp = {shards}, "
                     f"{jax.process_count()} processes)")
  return local_rows // held * shards


def local_rows(tree, mesh):
  """The process-local rows (numpy) of batch-sharded global arrays, e.g. the scores of the rows
  this process fed in; the inverse of `shard_batch`."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  local = multihost_utils.global_array_to_host_local_array(
      tree, mesh, jax.tree.map(lambda x: P(BATCH, *([None] * (x.ndim - 1))), tree))
  return jax.tree.map(np.asarray, local)


def to_host(tree):
  """Whole global arrays as numpy on every process (all-gathers across processes when needed;
  a sharded array of another process cannot be read with np.asarray)."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def is_primary() -> bool:
  """Process 0: the one that writes results, metrics and plots and prints progress."""
  return jax.process_index() == 0


def shard_global_batch(batch, mesh):
  """`shard_batch` of a GLOBAL host batch that every process holds alike: each feeds its rows."""
  if jax.process_count() == 1:
    return shard_batch(batch, mesh)
  def own(x):
    x = np.asarray(x)
    return x if x.ndim == 0 else x[process_batch_rows(mesh, x.shape[0])]
  return shard_batch(jax.tree.map(own, batch), mesh)


def _bytes_of(obj) -> np.ndarray:
  return np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)


def gather_rows(rows: list) -> list:
  """The concatenation, in process order, of every process's list of JSON-able records (the
  process-local rows of a batch -> the global batch, on every process)."""
  if jax.process_count() == 1:
    return list(rows)
  data = _bytes_of(list(rows))
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  out = []
  for size, row in zip(sizes, every):
    out.extend(json.loads(row[:int(size)].tobytes().decode("utf-8")))
  return out


def broadcast_object(obj):
  """Process 0's value of a JSON-able object, on every process."""
  if jax.process_count() == 1:
    return obj
  data = _bytes_of(obj)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int64)))
  padded = np.zeros(size, np.uint8)
  if is_primary():
    padded[:] = data
  padded = np.asarray(multihost_utils.broadcast_one_to_all(padded))
  return json.loads(padded.tobytes().decode("utf-8"))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([bool(flag)]))).any())


def sync(name: str) -> None:
  """Waits until every process reached the barrier `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
