"""Evaluate a checkpoint on math benchmarks, training nothing: any Hugging Face directory (a
released model, or a stage's export `<workdir>/<stage>/hf`), local or gs://.

  python -m opsd_jax.main --config experiments/eval_math.py --workdir runs/eval_qwen3_8b \
      --config.init_from=/path/to/Qwen3-8B \
      --config.eval.sets.math500.path=.../math500.jsonl \
      --config.eval.sets.aime24.path=.../aime24.jsonl \
      --config.eval.sets.aime25.path=.../aime25.jsonl [--config.eval.thinking=off]

Writes results.md / results.json (each benchmark: avg@k, pass@k, lengths of all / correct /
incorrect responses, truncation and hesitation markers; and their mean) and benchmarks.png;
every response with its verdict lands in <workdir>/eval/init/<set>.jsonl. Rerunning the command
resumes at the benchmark and the chunk of problems where it stopped.

Defaults follow Qwen3's thinking evaluation convention (T 0.6 / top-p 0.95 / top-k 20), with a
16,384-token budget (Qwen3 recommends 32,768), avg@8 on MATH500 and avg@16 on AIME; a set left
without a path is an error, so drop it with e.g. `--config.eval.sets=...` in your own file.
"""
from experiments import math_benchmarks
from opsd_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.name = "eval_math"
  c.stages = ("eval",)
  c.init_from = "/path/to/checkpoint"
  c.model.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.tokenizer.update(dict(kind="hf", path="", chat_template="checkpoint"))
  c.data.update(dict(kind="jsonl", format="auto"))
  c.sampling.update(dict(prompt_buckets=(256, 512, 1024, 2048), continuous_batching=True))
  c.eval.update(dict(num_problems=500, samples_per_problem=8, temperature=0.6, top_p=0.95,
                     top_k=20, max_new_tokens=16_384, batch_size=256, thinking="on"))
  c.eval.sets = math_benchmarks.sets()
  return c
