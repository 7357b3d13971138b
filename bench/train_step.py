"""Step time and MFU of the SFT, GRPO and OPSD steps on the ~23M model at batch 8 x 512 tokens,
beside a PyTorch eager train step (transformers Qwen3ForCausalLM, float32, AdamW) of the same
model and batch, and the f32 matmul peak of this machine, all measured in the same run.

FLOPs counted as executed matmul work: 6 x (non-embedding params + unembedding) per trained token
for forward + backward, plus 12 x L x T x heads x head_dim per token for attention (full T x T
scores, as computed); the OPSD teacher adds a forward (a third of that) over its own tokens.

Also the SFT step's matmuls alone (`dots_floor`), jitted at the step's shapes, and the share of
the SFT step's time they account for.

  python bench/train_step.py [--iters 3] [--batch 8] [--seq 512] [--malloc reuse|system]
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opsd_jax import host_malloc, kernels, model, parallel  # noqa: E402
from opsd_jax.config import ModelConfig, default_config  # noqa: E402
from opsd_jax.train import optim, state as state_lib, steps  # noqa: E402

CFG = ModelConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64,
                  mlp_dim=1536, tie_embeddings=True)


def flops_per_token(cfg, T, forward_only=False):
  per_layer = (cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
               + 3 * cfg.d_model * cfg.mlp_dim)
  matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model
  attention = 2 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim  # per token, forward multiplier
  forward = 2 * matmul_params + 2 * attention
  return forward if forward_only else 3 * forward


def timed(fn, iters):
  fn()  # compile + warm up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(n=2048, iters=10):
  """The best rate of `iters` 2048^3 f32 matmuls: a peak is the most the machine does, and a
  median over a noisy neighbour's slowdowns read as low as 409 against a best of 496 GFLOP/s."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def dots_floor(batch, seq, iters):
  """The SFT step's matmuls alone, jitted, at the shapes the step runs them: per layer each
  projection's forward, input gradient and weight gradient, and causal attention's six dots per
  query block (the model's own blocks: scores, output, and their four gradients); then the
  unembedding's three. No norm, softmax, activation, loss or optimizer work: what the step would
  take if everything but its matmuls were free, at XLA's matmul rates on this machine. Returns
  seconds per step (each part the median of `iters`)."""
  cfg, M = CFG, batch * seq
  D, F, H, K = cfg.d_model, cfg.mlp_dim, cfg.head_dim, cfg.n_kv_heads
  G = cfg.n_heads // K
  shapes = [(D, cfg.n_heads * H), (D, K * H), (D, K * H), (cfg.n_heads * H, D),
            (D, F), (D, F), (F, D)]
  edges = kernels.causal_block_edges(seq)
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731

  @jax.jit
  def layer(xs, ws, dys, q, k, v, d_out):
    outs = []
    for x, w, dy in zip(xs, ws, dys):
      outs += [x @ w, dy @ w.T, x.T @ dy]
    for a, b in zip(edges[:-1], edges[1:]):  # q, d_out [B*K, G, T, H]; k, v [B*K, S, H]
      qb, db, kb, vb = q[:, :, a:b], d_out[:, :, a:b], k[:, :b], v[:, :b]
      p = jnp.einsum("ngth,nsh->ngts", qb, kb)
      d_p = jnp.einsum("ngth,nsh->ngts", db, vb)
      outs += [jnp.einsum("ngts,nsh->ngth", p, vb), jnp.einsum("ngts,ngth->nsh", p, db),
               jnp.einsum("ngts,nsh->ngth", d_p, kb), jnp.einsum("ngts,ngth->nsh", d_p, qb)]
    return outs

  @jax.jit
  def unembed(x, w, dy):
    return x @ w, dy @ w.T, x.T @ dy

  layer_args = ([normal(M, a) for a, _ in shapes], [normal(a, b) for a, b in shapes],
                [normal(M, b) for _, b in shapes], normal(batch * K, G, seq, H),
                normal(batch * K, seq, H), normal(batch * K, seq, H), normal(batch * K, G, seq, H))
  unembed_args = normal(M, D), normal(D, cfg.vocab_size), normal(M, cfg.vocab_size)
  per_layer = timed(lambda: jax.block_until_ready(layer(*layer_args)), iters)
  head = timed(lambda: jax.block_until_ready(unembed(*unembed_args)), iters)
  return cfg.n_layers * per_layer + head


def jax_steps(batch, seq, iters):
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = default_config()
  tx = optim.make_optimizer(c.optimizer, 100)
  params = jax.jit(lambda k: model.init(CFG, k))(jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (batch, seq)).astype(np.int32)
  results = {}

  sft = dict(tokens=tokens, loss_mask=np.ones_like(tokens), segment_ids=np.ones_like(tokens),
             positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)))
  P = seq // 4
  C = seq - P
  rollout = dict(tokens=tokens, mask=np.ones_like(tokens), completion_mask=np.ones((batch, C),
                 np.float32), advantages=rng.normal(size=batch).astype(np.float32),
                 teacher_tokens=tokens, teacher_mask=np.ones_like(tokens),
                 correct=np.ones(batch, bool))
  score = steps.make_score_fn(CFG, mesh)
  rollout["old_logprobs"] = np.asarray(score(params, parallel.shard_batch(rollout, mesh)))

  for name, make, teacher in (
      ("sft", lambda: steps.make_sft_step(CFG, c.sft, tx, mesh), False),
      ("grpo", lambda: steps.make_grpo_step(CFG, c.rlvr, tx, mesh), False),
      ("opsd", lambda: steps.make_opsd_step(CFG, c.opsd, tx, mesh), True)):
    data = parallel.shard_batch(sft if name == "sft" else rollout, mesh)
    step = make()
    holder = [state_lib.create(params, tx, jax.random.key(1),
                               teacher_params=params if teacher else None, model_cfg=CFG,
                               mesh=mesh)]

    def run():
      holder[0], metrics = step(holder[0], data)
      jax.block_until_ready(metrics)

    seconds = timed(run, iters)
    flops = batch * seq * flops_per_token(CFG, seq)
    if teacher:
      flops += batch * seq * flops_per_token(CFG, seq, forward_only=True)
    results[name] = (seconds, flops)
  return results


def torch_step(batch, seq, iters):
  import torch
  import transformers
  config = transformers.Qwen3Config(
      vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, num_hidden_layers=CFG.n_layers,
      num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
      head_dim=CFG.head_dim, intermediate_size=CFG.mlp_dim, tie_word_embeddings=True,
      max_position_embeddings=4096, attn_implementation="sdpa")
  torch.manual_seed(0)
  net = transformers.Qwen3ForCausalLM(config).float()
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
  tokens = torch.randint(0, CFG.vocab_size, (batch, seq))

  def run():
    opt.zero_grad(set_to_none=True)
    loss = net(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()

  return timed(run, iters), torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--malloc", choices=("reuse", "system"), default="reuse",
                      help="reuse: host_malloc.reuse_host_temporaries() (what CPU training of a "
                           "model this size should run with); system: glibc's defaults")
  args = parser.parse_args()
  # Before JAX starts; PyTorch, in this process, gets the same malloc.
  reused = args.malloc == "reuse" and host_malloc.reuse_host_temporaries()
  print(json.dumps({"bench": "host_malloc", "reuse_host_temporaries": reused}), flush=True)
  tokens = args.batch * args.seq
  peak = matmul_peak()
  device = jax.devices()[0].device_kind
  print(json.dumps({"bench": "matmul_peak_f32", "device": device,
                    "GFLOPs": round(peak / 1e9, 1)}), flush=True)
  torch_tok_s = None
  if not args.skip_torch:
    seconds, threads = torch_step(args.batch, args.seq, args.iters)
    torch_tok_s = tokens / seconds
    flops = tokens * flops_per_token(CFG, args.seq)
    print(json.dumps({"bench": "train_step", "impl": "pytorch_eager", "stage": "sft",
                      "step_s": round(seconds, 3), "tokens_per_s": round(torch_tok_s, 1),
                      "mfu": round(flops / seconds / peak, 3), "threads": threads}), flush=True)
  floor = dots_floor(args.batch, args.seq, args.iters)
  floor_flops = tokens * flops_per_token(CFG, args.seq)
  print(json.dumps({"bench": "train_step", "impl": "matmuls_alone", "stage": "sft",
                    "step_s": round(floor, 3), "tokens_per_s": round(tokens / floor, 1),
                    "mfu": round(floor_flops / floor / peak, 3)}
                   | ({"speedup_vs_pytorch": round(tokens / floor / torch_tok_s, 2)}
                      if torch_tok_s else {})), flush=True)
  results = jax_steps(args.batch, args.seq, args.iters)
  for name, (seconds, flops) in results.items():
    row = {"bench": "train_step", "impl": "opsd_jax", "stage": name, "device": device,
           "batch": args.batch, "seq": args.seq, "params_M": round(CFG.num_params() / 1e6, 1),
           "step_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "mfu": round(flops / seconds / peak, 3)}
    if torch_tok_s:
      row["speedup_vs_pytorch"] = round(tokens / seconds / torch_tok_s, 2)
    if name == "sft":
      row["matmuls_alone_share"] = round(floor / seconds, 2)
    print(json.dumps(row), flush=True)
  print(json.dumps({"bench": "train_step_ratio", "opsd_over_sft_step_time":
                    round(results["opsd"][0] / results["sft"][0], 2)}), flush=True)


if __name__ == "__main__":
  main()
