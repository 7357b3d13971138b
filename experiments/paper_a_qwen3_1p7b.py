"""Zhao et al. (2026, v3 of 20 Mar), "Self-Distilled Reasoner: On-Policy Self-Distillation":
OPSD on Qwen3-1.7B with a thinking-off student and a thinking-on teacher.

The student answers without thinking; the teacher (the frozen starting model, LoRA off) sees the
problem and the reference solution with thinking on, its thought closed before the student's
answer (opsd.teacher_thought), and both score the student's tokens. The checkpoint is evaluated
before and after in the student's mode (thinking off).

  python -m opsd_jax.main --config experiments/paper_a_qwen3_1p7b.py --workdir runs/paper_a \
      --config.init_from=/path/to/Qwen3-1.7B \
      --config.data.train_path=/path/to/openthoughts_math.jsonl \
      --config.eval.sets.math500.path=... --config.eval.sets.aime24.path=... \
      --config.eval.sets.aime25.path=... [--dry_run --config.plan.tpu=v5e-16]

init_from is a Hugging Face directory (local or gs://) whose tokenizer files and chat template
are used; `--dry_run` needs only its config.json and tokenizer files.

| setting | value | source |
|---|---|---|
| model | Qwen3-1.7B | paper |
| student / teacher thinking | off / on | paper (v3) |
| divergence | forward KL, full vocabulary, pointwise clip tau 0.05 (0.06 at 8B) | paper (v3) |
| loss temperature | 1.1 (the sampling temperature) | paper |
| teacher | frozen: the base with LoRA off | paper |
| rollouts | all (no correctness filter), 1 per prompt, 32 prompts per step | paper |
| LoRA | rank 64, alpha 128, attention and MLP projections | paper |
| optimizer | lr 5e-6, grad clip 0.1 | paper |
| rollout sampling | T 1.1 / top-p 0.95 / top-k 20, 1,024 new tokens | paper |
| steps | 100 | paper (~100) |
| training data | 30k OpenThoughts math problems with solutions | paper |
| evaluation | MATH500, AIME24, AIME25, avg@8 (AIME avg@16), T 0.6 / 0.95 / 20, 8,192 new tokens, thinking off | chosen (the student's mode; Qwen3 sampling convention) |
| warmup, Adam b2, reduction | 0, 0.999, token mean | chosen |
"""
from experiments import math_benchmarks
from opsd_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.name = "paper_a_qwen3_1p7b"
  c.stages = ("opsd",)
  c.init_from = "/path/to/Qwen3-1.7B"
  c.model.update(dict(dtype="bfloat16", param_dtype="bfloat16", remat="full"))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.tokenizer.update(dict(kind="hf", path="", chat_template="checkpoint"))
  c.data.update(dict(kind="jsonl", train_path="/path/to/openthoughts_math.jsonl", format="auto"))
  c.sampling.update(dict(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=1024,
                         prompt_buckets=(256, 512, 1024, 2048), continuous_batching=True))
  c.optimizer.update(dict(learning_rate=5e-6, grad_clip=0.1, warmup_steps=0, b2=0.999,
                          state_dtype="float32"))
  c.lora.update(dict(rank=64, alpha=128.0))
  c.opsd.update(dict(steps=100, prompts_per_step=32, rollouts_per_prompt=1, mini_batches=4,
                     teacher="frozen", teacher_context="full", divergence="fkl", clip=0.05,
                     estimator="full", loss_temperature=1.1, reduction="token",
                     rollout_filter="all", student_thinking=False, teacher_thinking=True,
                     checkpoint_every=10))
  c.eval.update(dict(num_problems=500, samples_per_problem=8, temperature=0.6, top_p=0.95,
                     top_k=20, max_new_tokens=8192, batch_size=256, thinking="student"))
  c.eval.sets = math_benchmarks.sets()
  c.export.hf = True
  c.loss_chunk = 256
  return c
