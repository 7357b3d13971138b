"""Peak memory of the OPSD full-vocabulary loss + gradient, chunked over T vs unchunked.

Only the loss head is measured (student and teacher hidden states [1, T, D] in, the tied
unembedding [V, D] shared, gradient w.r.t. student hidden states and the unembedding): the model
body is the same for both variants. Memory comes from XLA's compiled memory analysis (nothing is
executed), peak = temp + argument + output bytes. One JSON line per (T, variant).

  python bench/loss_memory.py [--vocab 151936] [--d_model 1024] [--chunk 256]
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opsd_jax import losses  # noqa: E402


def loss_fn(embedding_VD, h_student_BTD, h_teacher_BTD, chunk, kind):
  def per_chunk(x):
    h_s, h_t = x
    s_logits = jnp.einsum("BTD,VD->BTV", h_s, embedding_VD)
    t_logits = jax.lax.stop_gradient(jnp.einsum("BTD,VD->BTV", h_t, embedding_VD))
    return losses.token_divergence(s_logits, t_logits, kind)

  if chunk is None:  # unchunked: the full [B, T, V] logits of both sides
    per_token = per_chunk((h_student_BTD, h_teacher_BTD))
  else:
    per_token = losses.chunk_map(per_chunk, (h_student_BTD, h_teacher_BTD), chunk)
  return jnp.mean(per_token)


def measure(T, V, D, chunk, kind):
  shapes = (jax.ShapeDtypeStruct((V, D), jnp.float32), jax.ShapeDtypeStruct((1, T, D), jnp.float32),
            jax.ShapeDtypeStruct((1, T, D), jnp.float32))
  grad = jax.grad(lambda e, hs, ht: loss_fn(e, hs, ht, chunk, kind), argnums=(0, 1))
  start = time.perf_counter()
  mem = jax.jit(grad).lower(*shapes).compile().memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  return {"bench": "opsd_loss_memory", "T": T, "V": V, "d_model": D, "divergence": kind,
          "variant": "unchunked" if chunk is None else f"chunked_{chunk}",
          "temp_MiB": round(mem.temp_size_in_bytes / 2**20, 1),
          "argument_MiB": round(mem.argument_size_in_bytes / 2**20, 1),
          "output_MiB": round(mem.output_size_in_bytes / 2**20, 1),
          "peak_MiB": round(peak / 2**20, 1),
          "one_TxV_f32_MiB": round(T * V * 4 / 2**20, 1),
          "compile_s": round(time.perf_counter() - start, 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--vocab", type=int, default=151_936)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--divergence", default="rkl")
  parser.add_argument("--lengths", default="1024,2048,4096")
  args = parser.parse_args()
  rows = []
  for T in (int(t) for t in args.lengths.split(",")):
    for chunk in (args.chunk, None):
      rows.append(measure(T, args.vocab, args.d_model, chunk, args.divergence))
      print(json.dumps(rows[-1]), flush=True)
  for variant in {r["variant"] for r in rows}:
    mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["T"])
    growth = (mine[-1]["peak_MiB"] - mine[0]["peak_MiB"]) / (mine[-1]["T"] - mine[0]["T"])
    print(json.dumps({"bench": "opsd_loss_memory_growth", "variant": variant,
                      "MiB_per_extra_token": round(growth, 3),
                      "one_V_row_f32_MiB": round(args.vocab * 4 / 2**20, 3)}), flush=True)


if __name__ == "__main__":
  main()
