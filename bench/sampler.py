"""Sampler throughput beside its peers, one JSON line per measurement.

Model: ~23M-parameter Qwen3 shape (vocab 8192, d_model 512, 6 layers, 8 heads, 4 KV heads,
head_dim 64, MLP 1536, tied embeddings), random init, saved with hf.save so transformers and tunix
load the same weights. Workload: 64-token prompts, 256 new tokens, no early stop, temperature 1.

  python bench/sampler.py [--repeats 2] [--only ours,floor,nocache,hf,tunix,position,skewed]

Every implementation, peers included, is timed as the best of --repeats runs after a warm-up run.

Each line: {"bench", "batch", "impl", "tok_s" | "ms_per_token" | "seconds", ...}. Peers:
  nocache  the same model, full recompute of the whole (fixed-size) sequence every step;
  hf       transformers generate (PyTorch CPU, use_cache=True, sampling, min_new_tokens = max);
  tunix    tunix's Sampler in /tmp/tunix-venv (a subprocess; skipped with a note if absent);
  floor    one decode step's weight matmuls alone, jitted: no decoder of this model beats it here.
  stream_rate  (position) the 1024/128 ratio if the longer context cost only the read of its
      extra cache bytes at this machine's stream rate, added to our 128-token step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opsd_jax import hf, kv_cache, model, sampling  # noqa: E402
from opsd_jax.config import ModelConfig  # noqa: E402

CFG = ModelConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64,
                  mlp_dim=1536, family="qwen3", tie_embeddings=True)
PROMPT_LEN, NEW_TOKENS = 64, 256
TUNIX_PYTHON = "/tmp/tunix-venv/bin/python"


def emit(**fields):
  print(json.dumps(fields), flush=True)


def random_prompts(n, length, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, CFG.vocab_size, length)) for _ in range(n)]


def timed(fn, repeats=1):
  """Best wall time of `repeats` runs after one warm-up run (compiles)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def ours(params, prompts, num_samples=1, new_tokens=NEW_TOKENS, **kw):
  def run():
    out = sampling.generate(CFG, params, prompts, rng=jax.random.key(0), max_new_tokens=new_tokens,
                            num_samples=num_samples, temperature=1.0, **kw)
    return out
  return run


def bench_ours(params, repeats):
  for batch in (1, 8, 32):
    s = timed(ours(params, random_prompts(batch, PROMPT_LEN)), repeats)
    emit(bench="decode", batch=batch, impl="opsd_jax", tok_s=batch * NEW_TOKENS / s, seconds=s)
  s = timed(ours(params, random_prompts(8, PROMPT_LEN), num_samples=8), repeats)
  emit(bench="group", batch="8x8", impl="opsd_jax", tok_s=64 * NEW_TOKENS / s, seconds=s)


def bench_floor(params, repeats):
  """One decode step's weight matmuls (q, k, v, o, gate, up, down per layer; the unembedding):
  layers unrolled over weights sliced once, steps looped inside one jit (no per-step dispatch, no
  per-step weight slicing), so nothing but the matmuls and a few adds is timed."""
  steps = 32

  @jax.jit
  def run_steps(params, x_BD):
    layers = model.unstack_layers(params)["layers"]
    def step(_, x):
      for w in layers:
        a, m = w["attn"], w["mlp"]
        q = jnp.einsum("BD,DNH->BNH", x, a["q_proj"]["kernel"])
        k = jnp.einsum("BD,DNH->BNH", x, a["k_proj"]["kernel"])
        v = jnp.einsum("BD,DNH->BNH", x, a["v_proj"]["kernel"])
        o = jnp.einsum("BNH,NHD->BD", q, a["o_proj"]["kernel"])
        h = jnp.einsum("BD,DF->BF", x + o, m["gate"]["kernel"]) * jnp.einsum(
            "BD,DF->BF", x, m["up"]["kernel"])
        x = x + jnp.einsum("BF,FD->BD", h, m["down"]["kernel"]) + k.sum() + v.sum()
      return (x @ params["embed"]["embedding"].T)[:, :CFG.d_model]
    return jax.lax.fori_loop(0, steps, step, x_BD)

  for batch in (1, 8, 32):
    x = jnp.ones((batch, CFG.d_model), jnp.float32)
    s = timed(lambda: jax.block_until_ready(run_steps(params, x)), repeats) / steps
    emit(bench="decode", batch=batch, impl="floor", tok_s=batch / s, ms_per_step=s * 1e3)


def bench_nocache(params, repeats):
  """Full recompute of a fixed [B, prompt + new] buffer per step: the per-step cost is constant,
  so a few steps give the throughput of the whole 256."""
  total = PROMPT_LEN + NEW_TOKENS

  @jax.jit
  def step(tokens_BT, t, key):
    mask = jnp.arange(total)[None] < t
    logits = model.forward(CFG, params, tokens_BT, mask_BT=mask)
    nxt = jax.random.categorical(key, logits[:, t - 1])
    return tokens_BT.at[:, t].set(nxt)

  for batch in (1, 8, 32):
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :PROMPT_LEN].set(
        jnp.asarray(random_prompts(batch, PROMPT_LEN)))
    steps = 8
    def run():
      y = tokens
      for i in range(steps):
        y = step(y, PROMPT_LEN + i, jax.random.key(i))
      jax.block_until_ready(y)
    s = timed(run, repeats) / steps
    emit(bench="decode", batch=batch, impl="nocache", tok_s=batch / s, ms_per_step=s * 1e3,
         note=f"{steps} steps timed; full recompute of {total} tokens per step")


def bench_hf(path, repeats):
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  for batch, samples in ((1, 1), (8, 1), (32, 1), (8, 8)):
    ids = torch.tensor(random_prompts(batch, PROMPT_LEN))
    def run():
      with torch.no_grad():
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                          top_p=1.0, temperature=1.0, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, num_return_sequences=samples,
                          use_cache=True, pad_token_id=0)
    s = timed(run, repeats)
    emit(bench="group" if samples > 1 else "decode",
         batch=f"{batch}x{samples}" if samples > 1 else batch, impl="transformers",
         tok_s=batch * samples * NEW_TOKENS / s, seconds=s)


def bench_tunix(path, repeats):
  if not os.path.exists(TUNIX_PYTHON):
    emit(bench="decode", impl="tunix", note=f"skipped: {TUNIX_PYTHON} not found")
    return
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunix_sampler.py")
  proc = subprocess.run([TUNIX_PYTHON, script, path, str(PROMPT_LEN), str(NEW_TOKENS), str(repeats)],
                        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  for line in lines:
    print(line, flush=True)
  if proc.returncode or not lines:
    emit(bench="decode", impl="tunix", note="failed: " + proc.stderr.strip()[-600:])


def stream_bytes_per_s(nbytes):
  """This machine's read rate over nbytes of float32: a jitted sum, the best of 20 runs."""
  x = jnp.ones((nbytes // 4 // 1024, 1024), jnp.float32)
  total = jax.jit(lambda x: x.sum(0))
  return x.nbytes / timed(lambda: jax.block_until_ready(total(x)), 20)


def bench_position(params, repeats):
  """Decode time per token with the context at ~128 and ~1024 tokens: the difference between
  65 and 1 new tokens from the same prompt, over 64 tokens (prefill cancels).

  Beside it, what that ratio is when the longer context costs nothing but its extra bytes: every
  step at 1024 reads 896 more slots of every layer's keys and values; their read time at this
  machine's stream rate (measured here), added to our 128-token step. A lower ratio needs that
  read overlapped with the step's other work."""
  extra_slots = 1024 - 128
  for batch in (1, 8):
    per_token = {}
    for length in (128, 1024):
      prompts = random_prompts(batch, length)
      buckets = (length,)
      long = timed(ours(params, prompts, new_tokens=65, prompt_buckets=buckets), repeats)
      short = timed(ours(params, prompts, new_tokens=1, prompt_buckets=buckets), repeats)
      per_token[length] = (long - short) / 64
      emit(bench="position", batch=batch, impl="opsd_jax", position=length,
           ms_per_token=per_token[length] * 1e3)
    emit(bench="position", batch=batch, impl="opsd_jax",
         ratio_1024_over_128=per_token[1024] / per_token[128])
    extra_cache = jax.eval_shape(lambda: kv_cache.init_cache(CFG, batch, extra_slots))
    extra_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(extra_cache))
    rate = stream_bytes_per_s(extra_bytes)
    emit(bench="position", batch=batch, impl="stream_rate", extra_cache_MiB=extra_bytes / 2**20,
         stream_GB_s=rate / 1e9, extra_ms_per_token=extra_bytes / rate * 1e3,
         ratio_if_extra_read_at_stream_rate=1 + extra_bytes / rate / per_token[128])


def bench_skewed(params, repeats):
  """128 rows, 32 at a time: EOS = the lowest 2 % of the vocabulary, so lengths are roughly
  geometric (mean ~50, a few reach the 256 limit). Static: 4 batches of 32, each running until its
  longest row ends. Continuous: 32 slots refilled as rows end."""
  eos = tuple(range(1, 1 + CFG.vocab_size // 50))
  prompts = random_prompts(128, PROMPT_LEN, seed=1)
  kw = dict(eos_ids=eos)
  def static():
    return [sampling.generate(CFG, params, prompts[i:i + 32], rng=jax.random.key(i),
                              max_new_tokens=NEW_TOKENS, **kw) for i in range(0, 128, 32)]
  def continuous():
    return sampling.generate(CFG, params, prompts, rng=jax.random.key(0), max_new_tokens=NEW_TOKENS,
                             continuous_batching=True, num_slots=32, **kw)
  lengths = np.concatenate([o.lengths for o in static()])
  s_static = timed(static, repeats)
  s_cont = timed(continuous, repeats)
  emit(bench="skewed", impl="opsd_jax", rows=128, slots=32, mean_length=float(lengths.mean()),
       max_length=int(lengths.max()), frac_at_limit=float((lengths == NEW_TOKENS).mean()),
       static_s=s_static, continuous_s=s_cont, speedup=s_static / s_cont)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="ours,floor,nocache,hf,tunix,position,skewed")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  parts = args.only.split(",")
  params = model.init(CFG, jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  emit(bench="setup", params=int(n_params), devices=str(jax.devices()), backend=jax.default_backend())
  with tempfile.TemporaryDirectory() as path:
    if "hf" in parts or "tunix" in parts:
      hf.save(path, CFG, params)
    if "ours" in parts:
      bench_ours(params, args.repeats)
    if "floor" in parts:
      bench_floor(params, args.repeats)
    if "nocache" in parts:
      bench_nocache(params, args.repeats)
    if "hf" in parts:
      bench_hf(path, args.repeats)
    if "tunix" in parts:
      bench_tunix(path, args.repeats)
    if "position" in parts:
      bench_position(params, args.repeats)
    if "skewed" in parts:
      bench_skewed(params, args.repeats)


if __name__ == "__main__":
  main()
