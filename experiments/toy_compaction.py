"""The embedded default: SFT -> RLVR -> OPSD (correct_only) on generated arithmetic, on a laptop CPU.

A ~1M-parameter Qwen3-shaped model learns verbose thinking traces in SFT (redundant "Wait, let me
double-check" segments and some slips), RLVR (GRPO) raises its accuracy, and OPSD on its own
correct rollouts, with the reference solution in the teacher's context, shortens the traces while
keeping accuracy. Everything (tokenizer, data, model) is made on the spot.
"""
from opsd_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.name = "toy_compaction"
  c.seed = 0
  c.model.update(dict(
      family="qwen3", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=384,
      rope_theta=10_000.0, tie_embeddings=True, max_position=512))
  c.data.update(dict(kind="toy", num_train=20_000, num_test=500, difficulty=0))
  c.tokenizer.kind = "toy"
  # Sampling at T = 1 (the policy's own distribution) for rollouts and evaluation alike: greedy
  # decoding never picks the re-check branch, so it would hide the verbosity OPSD removes.
  c.sampling.update(dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=160,
                         prompt_buckets=(48, 128)))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=50, schedule="cosine",
                          weight_decay=0.0, grad_clip=1.0))
  c.sft.update(dict(steps=1000, batch_size=16, seq_len=256, packing=True, concise_share=0.3,
                    checkpoint_every=200))
  # dynamic_sampling "mask" (not the library default "refill"): the README's figures were
  # measured with it; refill here waits for its own measurement.
  c.rlvr.update(dict(steps=60, prompts_per_step=16, group_size=8, learning_rate=2e-4,
                     warmup_steps=5,
                     advantage_scale="group", aggregation="token_mean", eps_low=0.2,
                     eps_high=0.28, dynamic_sampling="mask", checkpoint_every=20))
  c.opsd.update(dict(steps=40, prompts_per_step=32, rollouts_per_prompt=1, learning_rate=1.6e-4,
                     warmup_steps=5,
                     teacher="frozen", teacher_context="full", divergence="rkl",
                     estimator="full", rollout_filter="correct_only", loss_temperature=1.0,
                     reduction="token", checkpoint_every=20))
  c.eval.update(dict(num_problems=500, samples_per_problem=1, temperature=1.0,
                     max_new_tokens=160, batch_size=256))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return c
