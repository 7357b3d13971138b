"""Training-step throughput of the model and its MFU against this machine's measured matmul peak.

Model: ~23M-parameter Qwen3 shape (vocab 8192, d_model 512, 6 layers, 8 heads, 4 KV heads,
head_dim 64, MLP 1536, tied embeddings), random init; batch 8 x 512 tokens; loss = mean next-token
cross-entropy. One device (run it without the 8-fake-device flag).

  python bench/forward.py [--batch 8] [--seq 512] [--steps 5] [--dtype float32] [--remat none]

JSON lines: {"bench": "matmul_peak", ...} (a jitted n x n x n matmul in the same dtype, the peer
every MFU is measured against), then "forward" and "forward_backward" with tok_s, step_s,
flops_per_step, tflops and mfu.

FLOPs (counted, not measured; causal masking is not subtracted since the scores are computed in
full): matmul parameters P = every weight except the embedding lookup, plus the unembedding
V x D once (tied or not). Per step of B sequences of length T:
  forward          2 * P * B*T  +  4 * L * B * T^2 * N * H    (QK^T and PV: 2 T^2 N H each)
  forward+backward 3x the forward: 6 * P * B*T + 12 * L * B * T^2 * N * H
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opsd_jax import model  # noqa: E402
from opsd_jax.config import ModelConfig  # noqa: E402

CFG = ModelConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64,
                  mlp_dim=1536, family="qwen3", tie_embeddings=True, rope_theta=10_000.0)


def emit(**fields):
  print(json.dumps(fields), flush=True)


def timed(fn, steps):
  """Median wall time of `steps` runs after one warm-up run (compiles)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_peak(n, dtype, steps):
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds = timed(lambda: matmul(a, b), steps)
  return 2 * n ** 3 / seconds


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul: all but the embedding table, plus the unembedding."""
  embed_table = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  norms = cfg.n_layers * 2 * cfg.d_model + cfg.d_model + (2 * cfg.n_layers * cfg.head_dim
                                                         if cfg.qk_norm else 0)
  return cfg.num_params() - embed_table - norms + cfg.vocab_size * cfg.d_model


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
  attention = 4 * cfg.n_layers * batch * seq ** 2 * cfg.n_heads * cfg.head_dim
  return 2 * matmul_params(cfg) * batch * seq + attention


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--matmul_n", type=int, default=2048)
  args = parser.parse_args()

  cfg = CFG.replace(dtype=args.dtype, param_dtype=args.dtype, remat=args.remat)
  device = jax.devices()[0]
  common = dict(device=f"{device.platform}:{device.device_kind}", dtype=args.dtype,
                batch=args.batch, seq=args.seq)

  peak = matmul_peak(args.matmul_n, jnp.dtype(args.dtype), args.steps)
  emit(bench="matmul_peak", n=args.matmul_n, tflops=peak / 1e12, **common)

  params = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(p):
    logits = model.forward(cfg, p, inputs)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  fwd = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
  n_tokens = args.batch * args.seq
  flops = forward_flops(cfg, args.batch, args.seq)
  for name, fn, step_flops in (("forward", lambda: fwd(params), flops),
                               ("forward_backward", lambda: fwd_bwd(params), 3 * flops)):
    seconds = timed(fn, args.steps)
    emit(bench=name, params=cfg.num_params(), matmul_params=matmul_params(cfg),
         remat=args.remat, step_s=seconds, tok_s=n_tokens / seconds, flops_per_step=step_flops,
         tflops=step_flops / seconds / 1e12, mfu=step_flops / seconds / peak, **common)


if __name__ == "__main__":
  main()
