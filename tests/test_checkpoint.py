"""checkpoint: round trip, another mesh, keep-last-N, atomicity, missing/corrupt errors."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from opsd_jax import checkpoint, model, parallel

import helpers

CFG = helpers.tiny_config(64)


@functools.partial(jax.jit, static_argnums=0)
def _state(seed=0):
  """A train state as the stage loops keep it: params, AdamW state, step, typed rng key."""
  params = model.init(CFG, jax.random.key(seed))
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)  # nonzero moments
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(7 + seed),
          "rng": jax.random.key(seed + 11)}


def _assert_same(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_target_and_extra(tmp_path):
  state = _state()
  extra = {"data_iterator": {"epoch": 1, "index": 123}, "metrics": [{"loss": 1.5}]}
  checkpoint.save(str(tmp_path), 7, state, extra)
  assert checkpoint.latest_step(str(tmp_path)) == 7
  restored, restored_extra = checkpoint.restore(str(tmp_path), target=jax.eval_shape(_state))
  _assert_same(state, restored)  # containers (optax NamedTuples) and typed keys come back
  assert restored_extra == extra
  # The restored key generates the same numbers as the original.
  np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)),
                                jax.random.normal(state["rng"], (3,)))


def test_restore_without_target_gives_plain_containers(tmp_path):
  state = _state()
  checkpoint.save(str(tmp_path), 1, state)
  restored, extra = checkpoint.restore(str(tmp_path))
  assert extra == {}
  _assert_same(state["params"], restored["params"])
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert restored["params"]["embed"]["embedding"].sharding.device_set == {jax.devices()[0]}


def test_restore_onto_another_mesh(tmp_path):
  # Saved from one device...
  state = jax.device_put(_state(), jax.devices()[0])
  checkpoint.save(str(tmp_path), 3, state)
  # ...restored onto (data 2, fsdp 2, tensor 2) with the parameters sharded as in training.
  mesh = parallel.make_mesh(2, 2, 2)
  param_shardings = parallel.param_shardings(CFG, mesh)
  target = jax.eval_shape(_state)
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), target)
  shardings["params"] = param_shardings
  restored, _ = checkpoint.restore(str(tmp_path), target=target, target_shardings=shardings)
  _assert_same(state, restored)
  q = restored["params"]["layers"]["attn"]["q_proj"]["kernel"]  # [L, D, N, H]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
  assert restored["params"]["embed"]["embedding"].addressable_shards[0].data.shape == (32, 16)
  assert len(restored["step"].sharding.device_set) == 8


def test_keep_last_n(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, {"x": jnp.full((3,), float(step))}, {"step": step})
    assert ckpt.all_steps() == [3, 4]
    restored, extra = ckpt.restore(3)
  np.testing.assert_array_equal(restored["x"], np.full((3,), 3.0))
  assert extra == {"step": 3}
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_missing_checkpoint_errors(tmp_path):
  assert checkpoint.latest_step(str(tmp_path / "nowhere")) is None
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
    checkpoint.restore(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint under"):
    checkpoint.restore(str(tmp_path / "empty"))
  checkpoint.save(str(tmp_path / "one"), 5, {"x": jnp.zeros(2)})
  with pytest.raises(checkpoint.CheckpointError, match=r"step 4 .*available: \[5\]"):
    checkpoint.restore(str(tmp_path / "one"), step=4)


def test_corrupt_checkpoint_error(tmp_path):
  checkpoint.save(str(tmp_path), 2, {"x": jnp.arange(4.0)})
  state_dir = tmp_path / "2" / "state"
  for root, _, files in os.walk(state_dir):  # truncate every array file of the step
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "2")):
    checkpoint.restore(str(tmp_path))


def test_target_not_matching_checkpoint_is_an_error(tmp_path):
  checkpoint.save(str(tmp_path), 2, {"x": jnp.arange(4.0)})
  target = {"x": jax.ShapeDtypeStruct((5,), jnp.float32)}
  with pytest.raises(checkpoint.CheckpointError, match="could not be restored"):
    checkpoint.restore(str(tmp_path), target=target)


def test_extra_must_be_json(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="JSON"):
    checkpoint.save(str(tmp_path), 1, {"x": jnp.zeros(1)}, {"bad": object()})


def test_save_killed_before_commit_leaves_previous_step(tmp_path):
  """A process that dies in the middle of saving step 2 (after writing its files, before the
  commit rename) leaves step 1 as the latest, restorable checkpoint."""
  script = textwrap.dedent(f"""
      import os, jax.numpy as jnp
      from orbax.checkpoint._src.path import atomicity
      from opsd_jax import checkpoint
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
      ckpt.save(1, {{"x": jnp.full((4,), 1.0)}}, {{"step": 1}})
      async def die(*args, **kwargs):
        os._exit(9)  # SIGKILL-like: no cleanup, no finally blocks
      for cls in vars(atomicity).values():
        if isinstance(cls, type) and "finalize" in vars(cls):
          cls.finalize = die
      ckpt.save(2, {{"x": jnp.full((4,), 2.0)}}, {{"step": 2}})
      print("not reached")
  """)
  env = dict(os.environ, PYTHONPATH=os.getcwd(), XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 9, proc.stderr[-2000:]
  assert any("tmp" in name for name in os.listdir(tmp_path))  # the half-written step is there
  assert checkpoint.latest_step(str(tmp_path)) == 1
  restored, extra = checkpoint.restore(str(tmp_path))
  np.testing.assert_array_equal(restored["x"], np.full((4,), 1.0))
  assert extra == {"step": 1}


def test_params_snapshot_round_trip_onto_mesh(tmp_path):
  params = _state()["params"]
  final = str(tmp_path / "final")
  assert not checkpoint.exists(final)
  with pytest.raises(checkpoint.CheckpointError, match="no parameter snapshot"):
    checkpoint.load_params(final)
  checkpoint.save_params(final, params)
  checkpoint.save_params(final, params)  # overwriting an older snapshot is fine
  assert checkpoint.exists(final)
  mesh = parallel.make_mesh(2, 2, 2)
  restored = checkpoint.load_params(final, parallel.param_shardings(CFG, mesh))
  _assert_same(params, restored)
  assert restored["layers"]["mlp"]["up"]["kernel"].addressable_shards[0].data.shape == (2, 16, 24)
