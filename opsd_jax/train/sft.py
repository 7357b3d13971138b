"""Stage 1, SFT: next-token cross-entropy on the assistant's tokens (data -> steps)."""
from __future__ import annotations

from opsd_jax import data, parallel
from opsd_jax import prompts as prompts_lib
from opsd_jax.train import loop, steps


def examples(run) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, completion ids ending in EOS) for every training problem."""
  c = run.cfg
  if c.data.kind == "toy":
    from opsd_jax.data import toy
    return toy.sft_examples(run.train, run.tok, run.template,
                            concise_share=c.sft.concise_share, seed=c.seed,
                            thinking_off_share=c.sft.thinking_off_share)
  eos = run.tok.eos_ids[0]
  out = []
  for p in run.train:
    prompt = prompts_lib.student(run.tok, run.template, p["question"])
    response = p["reference"]
    if "\\boxed" not in response:
      response += f" The answer is \\boxed{{{p['answer']}}}."
    out.append((prompt, run.tok.encode(response) + [eos]))
  return out


def train(run, params):
  c = run.cfg.sft
  if c.steps == 0:
    return params
  lp = loop.StageLoop(run, "sft", params, total_steps=c.steps, learning_rate=c.learning_rate)
  batches = data.sft_batches(examples(run), c.batch_size, c.seq_len, run.tok.pad_id,
                             packing=c.packing, seed=run.cfg.seed)
  step_fn = steps.make_sft_step(lp.model_cfg, c, lp.optimizer, run.mesh,
                                chunk=run.cfg.loss_chunk, shardings=lp.shardings)

  def body(step, batch):
    del step
    # UPDATE (metrics stay on the device; the loop reads them a step later)
    lp.state, metrics = step_fn(lp.state, parallel.shard_batch(batch, run.mesh))
    return metrics

  return lp.train(batches, body)
