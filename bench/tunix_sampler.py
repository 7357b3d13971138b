"""tunix's Sampler on the bench model (run by bench/sampler.py inside /tmp/tunix-venv).

  python tunix_sampler.py MODEL_DIR PROMPT_LEN NEW_TOKENS [REPEATS]

Loads the same safetensors with tunix.models.qwen3.params; prompts are random token ids passed
through a tokenizer whose text is the ids themselves, so no tokenisation is timed; tunix prepends
BOS, so PROMPT_LEN - 1 ids + BOS = PROMPT_LEN tokens. Prints one JSON line per batch size (1, 8,
32), the best of REPEATS (default 1) runs after a compiling one, as bench/sampler.py times every
implementation: temperature 1 with top_p = 1 (tunix's sampling mode; without top_p it decodes
greedily), and an EOS id outside the vocabulary, so no row stops early.
"""
import json
import sys
import time

import jax
import numpy as np
from tunix.generate import sampler as sampler_lib
from tunix.models.qwen3 import model as qwen3_model
from tunix.models.qwen3 import params as qwen3_params


class IdTokenizer:
  """Text = space-separated token ids."""

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 1

  def eos_id(self):
    return -1  # outside the vocabulary: never sampled, no early stop

  def pad_id(self):
    return 0


def main():
  path, prompt_len, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 1
  hf = json.load(open(f"{path}/config.json"))
  cfg = qwen3_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]),
      norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"])
  # Auto axes: with jax's default Explicit axes tunix's embedding gather cannot resolve a sharding.
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with mesh:
    model = qwen3_params.create_model_from_safe_tensors(path, cfg, mesh)
  cache = sampler_lib.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=cfg.num_layers,
                                  num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
  sampler = sampler_lib.Sampler(model, IdTokenizer(), cache)
  rng = np.random.default_rng(0)
  for batch in (1, 8, 32):
    prompts = [" ".join(str(t) for t in rng.integers(2, 8000, prompt_len - 1))
               for _ in range(batch)]
    def run():
      return sampler(prompts, max_generation_steps=new_tokens, max_prompt_length=prompt_len,
                     temperature=1.0, top_p=1.0, eos_tokens=[-1], seed=0)
    out = run()  # compile
    generated = {len(t) for t in out.tokens}
    if generated != {new_tokens}:
      raise RuntimeError(f"tunix generated {generated} tokens per row, expected {new_tokens}")
    seconds = float("inf")
    for _ in range(repeats):  # best of `repeats`, as bench/sampler.py times its own
      start = time.perf_counter()
      run()
      seconds = min(seconds, time.perf_counter() - start)
    print(json.dumps({"bench": "decode", "batch": batch, "impl": "tunix",
                      "tok_s": batch * new_tokens / seconds, "seconds": seconds}), flush=True)


if __name__ == "__main__":
  main()
