"""Kim & Lee (2026), "OPSD Compresses What RLVR Teaches": OPSD as a compaction stage on an
already RL-trained reasoning model, here the released Qwen3-8B, thinking on throughout.

The run evaluates the checkpoint once (the base row), then trains two OPSD arms from it, each
evaluated like a stage: on the student's correct rollouts only (the paper: keeps accuracy,
responses ~29 % shorter) and on its incorrect rollouts only (the paper: costs accuracy).
Results: <workdir>/results.md (the base on each benchmark), grid.md / grid.png (the arms).

  python -m opsd_jax.main --config experiments/paper_b_qwen3_8b.py --workdir runs/paper_b \
      --config.init_from=/path/to/Qwen3-8B \
      --config.data.train_path=/path/to/math_train.jsonl \
      --config.eval.sets.math500.path=.../math500.jsonl \
      --config.eval.sets.aime24.path=.../aime24.jsonl \
      --config.eval.sets.aime25.path=.../aime25.jsonl [--dry_run --config.plan.tpu=v5p-8]

init_from is a Hugging Face directory (config.json, safetensors shards + index, tokenizer.json,
tokenizer_config.json, generation_config.json), local or gs://; the tokenizer and its chat
template are the checkpoint's own. `--dry_run` needs only config.json and the tokenizer files.
Memory (`--dry_run --config.plan.tpu=...`): an OPSD arm plans at ~79 GiB per chip on a v5p-8
(95 GiB); on a v5e-16 (16 GiB chips) it plans at ~30 GiB and does not fit, even with LoRA
(~23 GiB, the rollouts' KV cache dominates): use a v5p slice, or fewer rollouts per update.

Settings, and where each number comes from ("chosen": the paper does not state it;
docs/method.md says which of the paper's figures are second-hand):

| setting | value | source |
|---|---|---|
| model | Qwen3-8B, thinking on for student, teacher and evaluation | paper |
| teacher | frozen snapshot of the starting checkpoint | paper |
| teacher context | problem + full reference solution (Paper A's template) | paper |
| divergence | reverse KL as the paper writes it: the sampled-token advantage log p_T - log p_S (`estimator=sampled`; the grid's arm `rkl_sampled`); full-vocabulary rkl: `--config.opsd.estimator=full` (grid arm `rkl`) | paper (second-hand) |
| arms | correct-only, incorrect-only | paper |
| evaluation | MATH500, AIME24, AIME25; avg@8 (AIME avg@16), T 0.6 / top-p 0.95 / top-k 20 | paper (second-hand) / Qwen3 convention |
| evaluation budget | 16,384 new tokens | chosen (Qwen3 recommends 32,768) |
| learning rate | 5e-6, constant, AdamW b2 0.999, grad clip 0.1 | chosen (Paper A v3's) |
| prompts per step / rollouts per prompt | 32 / 4 | chosen |
| steps | 100 (compression shows within ~25) | chosen / paper (second-hand) |
| rollout sampling | T 0.6 / top-p 0.95 / top-k 20, 8,192 new tokens | chosen (Qwen3 thinking convention) |
| training data | MATH train (problems with reference solutions) | chosen |
| parameters | full fine-tuning, bf16 with float32 Adam state and master weights | chosen |
"""
from experiments import math_benchmarks
from opsd_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.name = "paper_b_qwen3_8b"
  c.stages = ("eval",)  # evaluate the released checkpoint; the arms below train from it
  c.init_from = "/path/to/Qwen3-8B"
  c.model.update(dict(dtype="bfloat16", param_dtype="bfloat16", remat="full"))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.tokenizer.update(dict(kind="hf", path="", chat_template="checkpoint"))  # init_from's files
  c.data.update(dict(kind="jsonl", train_path="/path/to/math_train.jsonl", format="auto"))
  c.sampling.update(dict(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=8192,
                         prompt_buckets=(256, 512, 1024, 2048), continuous_batching=True))
  c.optimizer.update(dict(learning_rate=5e-6, grad_clip=0.1, warmup_steps=0, b2=0.999,
                          state_dtype="float32", master_weights=True))
  c.opsd.update(dict(steps=100, prompts_per_step=32, rollouts_per_prompt=4, mini_batches=16,
                     teacher="frozen", teacher_context="full", divergence="rkl",
                     estimator="sampled", loss_temperature=1.0, rollout_filter="correct_only",
                     student_thinking=True, teacher_thinking=True, checkpoint_every=10))
  c.eval.update(dict(num_problems=500, samples_per_problem=8, temperature=0.6, top_p=0.95,
                     top_k=20, max_new_tokens=16_384, batch_size=256, thinking="student"))
  c.eval.sets = math_benchmarks.sets()
  c.grid.update(dict(rollout_filters=("correct_only", "incorrect_only"),
                     divergences=("rkl_sampled",), seeds=(0,)))
  c.export.hf = True
  c.loss_chunk = 256
  return c
