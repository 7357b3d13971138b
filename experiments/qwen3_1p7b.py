"""Qwen3-1.7B: RLVR -> OPSD compaction on local math data (see qwen3_8b.py for the settings and
the paths to set). Paper A v3's clip tau = 0.05 below 8B."""
from experiments import qwen3_8b

ARCH = dict(qwen3_8b.ARCH, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
            mlp_dim=6144, tie_embeddings=True)


def get_config():
  return qwen3_8b.base(ARCH, "qwen3_1p7b", clip=0.05)
