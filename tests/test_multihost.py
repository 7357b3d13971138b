"""Multi-host: 2 processes x 4 fake CPU devices on localhost (JAX's multi-controller runtime, gloo
collectives) run real SFT, GRPO and OPSD steps on a (data 2, fsdp 2, tensor 2) mesh, each process
feeding only its own rows; loss, metrics and updated params must equal this (single) process's run
on its 8 devices. The workers are this file run as a script: `python tests/test_multihost.py
worker OUT`, configured by $OPSD_COORDINATOR / $OPSD_NUM_PROCESSES / $OPSD_PROCESS_ID."""
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from opsd_jax import parallel
from opsd_jax.config import ModelConfig, default_config
from opsd_jax.train import optim, state as state_lib, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=56, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=48)
MESH = (2, 2, 2)
B = 8  # global rows; each process feeds 4
WORKER_TIMEOUT_S = 300


def sgd():
  # SGD: Adam's first step ~ lr * sign(g) would turn reduction-order noise into large differences.
  return optim.make_optimizer(ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=1.0, warmup_steps=0, schedule="constant", b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.0, grad_clip=0.0)), total_steps=10)


def global_batches():
  """Global SFT and rollout batches (every process builds them, then keeps its own rows)."""
  rng = np.random.default_rng(0)
  T = 12
  tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[0, 7:] = 2  # packed documents
  segment_ids[5, 9:] = 0  # padding, in the second process's rows
  positions = np.tile(np.arange(T), (B, 1)).astype(np.int32)
  positions[0, 7:] = np.arange(T - 7)
  loss_mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.int32) * (segment_ids != 0)
  loss_mask[6] = 0  # uneven trained tokens across processes: the loss is a global mean
  sft = dict(tokens=tokens, loss_mask=loss_mask.astype(np.int32), segment_ids=segment_ids,
             positions=positions)
  P, Pt, C = 5, 7, 6
  completion = rng.integers(0, CFG.vocab_size, (B, C))
  rollout_tokens = np.concatenate([rng.integers(0, CFG.vocab_size, (B, P)), completion], 1)
  mask = np.ones_like(rollout_tokens)
  mask[::3, :2] = 0
  completion_mask = np.ones((B, C), np.float32)
  completion_mask[5, 3:] = 0
  mask[5, P + 3:] = 0
  teacher_tokens = np.concatenate([rng.integers(0, CFG.vocab_size, (B, Pt)), completion], 1)
  teacher_mask = np.ones_like(teacher_tokens)
  teacher_mask[5, Pt + 3:] = 0
  rollout = dict(tokens=rollout_tokens.astype(np.int32), mask=mask.astype(np.int32),
                 completion_mask=completion_mask,
                 advantages=rng.normal(size=B).astype(np.float32),
                 teacher_tokens=teacher_tokens.astype(np.int32),
                 teacher_mask=teacher_mask.astype(np.int32), correct=np.arange(B) % 3 != 0)
  noise = rng.normal(0, 0.4, (B, C)).astype(np.float32)
  return sft, rollout, noise


def flat(prefix, tree):
  return {f"{prefix}{jax.tree_util.keystr(path)}": np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(parallel.to_host(tree))}


def run_steps(mesh):
  """One SFT, one GRPO and one OPSD step from the same random params; every result as numpy."""
  sft, rollout, noise = global_batches()
  rows = parallel.process_batch_rows(mesh, B)
  local = lambda batch: {k: v[rows] for k, v in batch.items()}  # noqa: E731
  params = parallel.to_host(parallel.init_params(CFG, jax.random.key(0), mesh))
  c = default_config()
  out = {"rows": np.array([rows.start, rows.stop])}

  tx = sgd()
  state = state_lib.create(params, tx, jax.random.key(1), model_cfg=CFG, mesh=mesh)
  state, m = steps.make_sft_step(CFG, c.sft, tx, mesh, chunk=4)(
      state, parallel.shard_batch(local(sft), mesh))
  out.update(flat("sft/params", state.params))
  out.update({f"sft/{k}": np.asarray(v) for k, v in m.items()})

  c.rlvr.kl_beta = 0.05
  state = state_lib.create(params, tx, jax.random.key(1), model_cfg=CFG, mesh=mesh)
  batch = local(rollout)
  score = steps.make_score_fn(CFG, mesh, temperature=0.7, chunk=4)
  # the learner's scores of this process's rows come back to this process (old != current:
  # noise, so that both clip ranges are exercised)
  batch["old_logprobs"] = parallel.local_rows(
      score(state.params, parallel.shard_batch(batch, mesh)), mesh) + noise[rows]
  batch["ref_logprobs"] = batch["old_logprobs"] - np.float32(0.1)
  out["grpo/old_logprobs"] = batch["old_logprobs"]
  state, m = steps.make_grpo_step(CFG, c.rlvr, tx, mesh, temperature=0.7, chunk=4)(
      state, parallel.shard_batch(batch, mesh))
  out.update(flat("grpo/params", state.params))
  out.update({f"grpo/{k}": np.asarray(v) for k, v in m.items()})

  c.opsd.teacher, c.opsd.ema_decay = "ema", 0.9
  c.opsd.divergence, c.opsd.rollout_filter, c.opsd.clip = "fkl", "split_direction", 0.05
  state = state_lib.create(params, tx, jax.random.key(1), teacher_params=params, model_cfg=CFG,
                           mesh=mesh)
  state, m = steps.make_opsd_step(CFG, c.opsd, tx, mesh, chunk=4)(
      state, parallel.shard_batch(local(rollout), mesh))
  out.update(flat("opsd/params", state.params))
  out.update(flat("opsd/teacher", state.teacher_params))
  out.update({f"opsd/{k}": np.asarray(v) for k, v in m.items()})
  return out


def worker(out_path):
  jax.config.update("jax_default_matmul_precision", "highest")
  assert parallel.initialize_distributed(initialization_timeout=120)
  assert jax.process_count() == 2 and jax.local_device_count() == 4, jax.devices()
  results = run_steps(parallel.make_mesh(*MESH))
  np.savez(f"{out_path}.{jax.process_index()}.npz", **results)
  jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_workers(out_path, n=2):
  port = free_port()
  procs = []
  for pid in range(n):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, OPSD_COORDINATOR=f"localhost:{port}",
               OPSD_NUM_PROCESSES=str(n), OPSD_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(out_path)], env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  return procs


@pytest.mark.slow  # three processes compile the same steps: ~1 min of CPU
def test_two_processes_equal_one_process_on_8_devices(tmp_path):
  procs = launch_workers(tmp_path / "out")
  try:
    want = run_steps(parallel.make_mesh(*MESH))  # meanwhile, here, on 8 devices
    logs = []
    for p in procs:
      logs.append(p.communicate(timeout=WORKER_TIMEOUT_S)[0])
  finally:
    for p in procs:  # a worker whose peer died would wait in a collective until killed
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"worker {pid} failed:\n{log[-4000:]}"

  got = [dict(np.load(tmp_path / f"out.{pid}.npz")) for pid in range(2)]
  assert [tuple(g["rows"]) for g in got] == [(0, 4), (4, 8)]  # each process fed its own half
  assert want["rows"].tolist() == [0, 8]
  assert float(want["grpo/clip_ratio/low"]) + float(want["grpo/clip_ratio/high"]) > 0
  for g in got:
    assert set(g) == set(want)
    np.testing.assert_allclose(g["grpo/old_logprobs"],
                               want["grpo/old_logprobs"][slice(*g["rows"])], rtol=1e-5,
                               atol=1e-6)
    for k in want:
      if k in ("rows", "grpo/old_logprobs"):
        continue
      np.testing.assert_allclose(g[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for stage in ("sft", "grpo", "opsd"):  # the steps did update the params
      assert float(g[f"{stage}/loss"]) != 0 and float(g[f"{stage}/grad_norm"]) > 0


def test_initialize_distributed_single_process_and_bad_arguments(monkeypatch):
  for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID,
               "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False  # plain machine: stays single-process
  assert parallel.initialize_distributed("localhost:1234", 1, 0) is False
  with pytest.raises(ValueError, match="num_processes, process_id missing"):
    parallel.initialize_distributed("localhost:1234")
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ValueError, match="OPSD_NUM_PROCESSES must be an integer"):
    parallel.initialize_distributed("localhost:1234", process_id=0)
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "2")
  with pytest.raises(ValueError, match="process_id < num_processes"):
    parallel.initialize_distributed("localhost:1234", process_id=2)
  with pytest.raises(ValueError, match="host:port"):
    parallel.initialize_distributed("localhost", process_id=0)
  assert not jax.distributed.is_initialized()


def test_shard_batch_round_trip_and_bad_local_batch():
  mesh = parallel.make_mesh(*MESH)
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  g = parallel.shard_batch({"x": x, "s": np.float32(2.0)}, mesh)
  assert g["x"].shape == (8, 3) and g["x"].sharding.spec[0] == parallel.BATCH
  np.testing.assert_array_equal(parallel.local_rows(g["x"], mesh), x)
  np.testing.assert_array_equal(parallel.to_host(g)["x"], x)
  assert float(g["s"]) == 2.0
  with pytest.raises(ValueError, match="6 rows, not divisible by the 4 data shards"):
    parallel.shard_batch(np.zeros((6, 2)), mesh)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  worker(sys.argv[2])
