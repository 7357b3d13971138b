"""Data path to token ids: the full GSM8K train file (7,473 rows) loaded and normalised, every
student and teacher prompt rendered with Qwen3's real chat template (thinking on) and encoded
with Qwen3's real tokenizer, the work a run does before its first step.

  python bench/data.py [--path tests/data/real/gsm8k_train.jsonl] [--one-by-one]

Phases: read (data.load: read + normalise), render (prompts.student_text / teacher_text through
the jinja template), tokenise (the tokenizers library's encode_batch, on all its threads; with
--one-by-one, tok.encode per prompt). One JSON line: {"bench": "data", "rows", "prompts",
"tokens", "read_s", "render_s", "tokenise_s", "total_s", "setup_s"}; setup_s (tokenizer file
parse, template compile) is outside total_s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from opsd_jax import data, prompts, tokenizer  # noqa: E402
from real_files import data_file, qwen3_tokenizer_dir  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--path", default=data_file("gsm8k_train.jsonl"))
  parser.add_argument("--one-by-one", action="store_true", help="tok.encode per prompt")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    tok = tokenizer.load("hf", qwen3_tokenizer_dir(os.path.join(tmp, "qwen3")))
    template = tokenizer.chat_template(tok, "checkpoint")
    setup_s = time.perf_counter() - start

    t0 = time.perf_counter()
    records, report = data.load(args.path)
    t1 = time.perf_counter()
    texts = [prompts.student_text(template, r["question"], thinking=True) for r in records]
    texts += [prompts.teacher_text(template, r["question"], r["reference"], thinking=True)
              for r in records]
    t2 = time.perf_counter()
    if args.one_by_one:
      ids = [tok.encode(t) for t in texts]
    else:
      ids = [e.ids for e in tok.tk.encode_batch(texts, add_special_tokens=False)]
    t3 = time.perf_counter()
    for i in range(0, len(texts), 997):  # batch encoding gives what the trainer's encode gives
      if ids[i] != tok.encode(texts[i]):
        raise SystemExit(f"bench/data.py: encode_batch differs from tok.encode on prompt {i}")
  print(json.dumps({"bench": "data", "path": os.path.relpath(args.path, ROOT),
                    "layout": report.layout, "rows": report.kept, "prompts": len(texts),
                    "tokens": sum(map(len, ids)), "encode": "one_by_one" if args.one_by_one
                    else "encode_batch", "read_s": round(t1 - t0, 3),
                    "render_s": round(t2 - t1, 3), "tokenise_s": round(t3 - t2, 3),
                    "total_s": round(t3 - t0, 3), "setup_s": round(setup_s, 3)}), flush=True)


if __name__ == "__main__":
  main()
