"""Qwen3-8B: RLVR -> OPSD compaction on local math data, on a TPU pod slice.

Paper A v3's OPSD settings (METHOD.md): forward KL with pointwise clip tau = 0.06 (8B), frozen
teacher, student thinking off / teacher on, 1 rollout per prompt, 1024 new tokens, sampling
T 1.1 / top-p 0.95 / top-k 20, lr 5e-6, grad clip 0.1, 32 prompts per step, ~100 steps; the
project's compaction default instead uses rkl on correct rollouts only (`--config.opsd.*`).
The checkpoint and data are local files (nothing is downloaded):
  --config.init_from=/path/to/Qwen3-8B  --config.tokenizer.path=/path/to/Qwen3-8B
  --config.data.train_path=/path/to/openthoughts_math.jsonl --config.data.test_path=.../math500.jsonl
`--dry_run` checks the rest and prints the plan with per-device memory; `--config.plan.tpu=v5p-8`
(or v5e-16, v6e-8, ...) plans it for that slice, fsdp over all its chips.
"""
from opsd_jax import config as config_lib

ARCH = dict(  # Qwen3-8B's config.json; with init_from set, the checkpoint's own config is used
    family="qwen3", vocab_size=151_936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8,
    head_dim=128, mlp_dim=12_288, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
    tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16", remat="full",
    max_position=40_960)


def base(arch, name, clip):
  c = config_lib.default_config()
  c.name = name
  c.stages = ("rlvr", "opsd")
  c.model.update(arch)
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.tokenizer.update(dict(kind="hf", path="/path/to/checkpoint", chat_template="checkpoint"))
  c.data.update(dict(kind="jsonl", train_path="/path/to/train.jsonl",
                     test_path="/path/to/test.jsonl", format="auto", num_test=500))
  c.sampling.update(dict(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=1024,
                         prompt_buckets=(256, 512, 1024), continuous_batching=True))
  # bf16 params with float32 Adam moments and a float32 master copy: at lr 5e-6 a bf16-only
  # update (half an ulp of a ~0.02 weight is ~6e-5) would round most steps away.
  c.optimizer.update(dict(learning_rate=5e-6, grad_clip=0.1, warmup_steps=0, b2=0.999,
                          state_dtype="float32", master_weights=True))
  c.rlvr.update(dict(steps=200, prompts_per_step=32, group_size=8, mini_batches=16,
                     eps_high=0.28, aggregation="token_mean", learning_rate=1e-6))
  c.opsd.update(dict(steps=100, prompts_per_step=32, rollouts_per_prompt=1, mini_batches=4,
                     teacher="frozen", teacher_context="full", divergence="fkl", clip=clip,
                     loss_temperature=1.1, rollout_filter="correct_only",
                     student_thinking=False, teacher_thinking=True, checkpoint_every=10))
  c.eval.update(dict(num_problems=500, samples_per_problem=8, temperature=0.6, top_p=0.95,
                     top_k=20, max_new_tokens=32_768, batch_size=256))
  # Memory (`--dry_run --config.plan.tpu=v5p-8` or v5e-16 prints the plan): remat full, 16 / 8
  # rollouts per RLVR / OPSD update (mini_batches 16 / 4; a 16-chip slice then holds one row per
  # chip), loss chunks of 256 tokens.
  c.loss_chunk = 256
  return c


def get_config():
  return base(ARCH, "qwen3_8b", clip=0.06)
