"""parallel: the same logits on one device and on a (data 2, fsdp 2, tensor 2) mesh with the
parameters really sharded; mesh-shape errors."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from opsd_jax import model, parallel
from opsd_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, tie_embeddings=False, qkv_bias=True)


def test_same_logits_on_one_device_and_on_a_sharded_mesh():
  mesh = parallel.make_mesh(2, 2, 2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  params = parallel.init_params(CFG, jax.random.key(0), mesh)

  # Parameters are really split: fsdp over `embed`, tensor over heads / mlp / vocab.
  def shard(x):
    return x.addressable_shards[0].data.shape
  layers = params["layers"]
  assert shard(layers["attn"]["q_proj"]["kernel"]) == (2, 16, 2, 8)   # [L, D/2, N/2, H]
  assert shard(layers["attn"]["q_proj"]["bias"]) == (2, 2, 8)
  assert shard(layers["attn"]["o_proj"]["kernel"]) == (2, 2, 8, 16)   # [L, N/2, H, D/2]
  assert shard(layers["mlp"]["gate"]["kernel"]) == (2, 16, 32)        # [L, D/2, F/2]
  assert shard(layers["mlp"]["down"]["kernel"]) == (2, 32, 16)        # [L, F/2, D/2]
  assert shard(params["embed"]["embedding"]) == (48, 16)              # [V/2, D/2]
  assert shard(params["lm_head"]["kernel"]) == (16, 48)               # [D/2, V/2]
  assert shard(layers["attn_norm"]["scale"]) == (2, 32)               # replicated
  assert layers["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert len(params["embed"]["embedding"].sharding.device_set) == 8

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (4, 10)).astype(np.int32)
  mask = np.ones((4, 10), bool)
  mask[1, :3] = mask[3, :6] = False  # left padding
  batch = parallel.shard_batch({"tokens": tokens, "mask": mask}, mesh)
  assert batch["tokens"].addressable_shards[0].data.shape == (1, 10)  # batch over data x fsdp

  sharded = jax.jit(lambda p, b: model.forward(CFG, p, b["tokens"], b["mask"]))(params, batch)
  on_one = jax.device_put(params, jax.devices()[0])
  single = jax.jit(lambda p, t, m: model.forward(CFG, p, t, m))(on_one, tokens, mask)
  assert single.sharding.device_set == {jax.devices()[0]}
  np.testing.assert_allclose(np.asarray(sharded)[mask], np.asarray(single)[mask], atol=1e-5,
                             rtol=1e-5)


def test_init_params_matches_unsharded_init():
  mesh = parallel.make_mesh(1, 4, 2)
  sharded = parallel.init_params(CFG, jax.random.key(3), mesh)
  plain = jax.jit(lambda k: model.init(CFG, k))(jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, plain)


def test_mesh_shape_resolution_and_errors():
  assert parallel.mesh_shape(-1, 2, 2, num_devices=8) == (2, 2, 2)
  assert parallel.mesh_shape(1, -1, 1, num_devices=8) == (1, 8, 1)
  assert parallel.mesh_shape(1, 1, 1, num_devices=1) == (1, 1, 1)
  with pytest.raises(ValueError, match="16 is larger than the 8 available devices"):
    parallel.mesh_shape(4, 2, 2, num_devices=8)
  with pytest.raises(ValueError, match="mesh larger or smaller than the devices"):
    parallel.mesh_shape(1, 2, 2, num_devices=8)  # 4 of 8, no -1 to absorb the rest
  with pytest.raises(ValueError, match="does not divide"):
    parallel.mesh_shape(-1, 3, 1, num_devices=8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel.mesh_shape(-1, -1, 2, num_devices=8)
  with pytest.raises(ValueError, match="larger than the 8 available devices"):
    parallel.make_mesh(2, 2, 4)  # 16 with the 8 test devices
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert mesh.size == 1
