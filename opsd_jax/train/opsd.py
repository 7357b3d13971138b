"""Stage 3, OPSD: the student samples on-policy -> verify -> rollout filter -> the teacher (the
same model with the reference solution in its context) scores the same tokens -> token-level
distillation. The teacher's parameters are a snapshot taken when the stage starts (frozen), an EMA
of the student, or the student itself under stop-gradient (current).
"""
from __future__ import annotations

import numpy as np

from opsd_jax import data, parallel
from opsd_jax import prompts as prompts_lib
from opsd_jax import rollouts as rollouts_lib
from opsd_jax.train import loop, steps

_FILTERS = {"all": lambda c: np.ones_like(c), "correct_only": lambda c: c,
            "incorrect_only": lambda c: ~c, "split_direction": lambda c: np.ones_like(c)}


def teacher_prompts(run, problems, rows) -> list[list[int]]:
  """The teacher's prompt ids in its own thinking mode; a thinking-on teacher of a thinking-off
  student ends with opsd.teacher_thought, closed (prompts.py's module doc)."""
  o = run.cfg.opsd
  return [prompts_lib.teacher(run.tok, run.template, problems[i]["question"],
                              problems[i]["reference"], context=o.teacher_context,
                              answer=problems[i]["answer"], thinking=o.teacher_thinking,
                              completion_thinking=o.student_thinking,
                              thought=o.teacher_thought) for i in rows]


def train(run, params):
  cfg, o, s = run.cfg, run.cfg.opsd, run.cfg.sampling
  if o.steps == 0:
    return params
  # A teacher copy for the EMA, and for the frozen snapshot without LoRA (with LoRA the frozen
  # teacher is the base alone: the stage's input, adapters off, held once).
  lora_on = run.cfg.get("lora") is not None and run.cfg.lora.rank > 0
  teacher = o.teacher == "ema" or (o.teacher == "frozen" and not lora_on)
  lp = loop.StageLoop(run, "opsd", params, total_steps=o.steps, learning_rate=o.learning_rate,
                      updates_per_step=o.mini_batches, teacher=teacher)
  prompts_it = data.record_batches(run.train, o.prompts_per_step, seed=cfg.seed + 2)
  extra = lp.resume()
  if extra:
    prompts_it.set_state(extra["data"])
  step_fn = steps.make_opsd_step(lp.model_cfg, o, lp.optimizer, run.mesh, chunk=cfg.loss_chunk)
  empty_total = int(extra.get("empty_batches", 0))
  for step in lp.steps():
    problems = parallel.gather_rows(next(prompts_it))  # global: each process read its rows
    ro = rollouts_lib.sample_and_grade(
        lp.sampler, lp.model_params(), problems, num_samples=o.rollouts_per_prompt,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        max_new_tokens=s.max_new_tokens, rng=lp.next_rng(step), thinking=o.student_thinking)
    tokens = ro.tokens[:, :rollouts_lib.completion_width(ro.lengths, s.max_new_tokens)]
    batch = rollouts_lib.learner_batch(ro.prompt_ids, tokens, ro.lengths, s.prompt_buckets,
                                       run.tok.pad_id)
    t = rollouts_lib.learner_batch(teacher_prompts(run, problems, ro.problem_ids), tokens,
                                   ro.lengths, s.prompt_buckets, run.tok.pad_id)
    batch.update(teacher_tokens=t["tokens"], teacher_mask=t["mask"], correct=ro.correct)
    selected = _FILTERS[o.rollout_filter](ro.correct)
    updates, empty = [], 0
    for mb, sel in zip(loop.split_rows(batch, o.mini_batches),
                       np.array_split(selected, o.mini_batches)):
      if not sel.any():  # the filter chose nothing: a defined no-op, no optimizer update
        empty += 1
        continue
      lp.state, m = step_fn(lp.state, parallel.shard_global_batch(mb, run.mesh))
      updates.append(m)
    empty_total += empty
    values = loop.mean_metrics(updates)
    values.update({
        "accuracy": float(ro.correct.mean()),
        "completions/mean_length": float(ro.lengths.mean()),
        "completions/mean_length_correct": float(ro.lengths[ro.correct].mean())
        if ro.correct.any() else float("nan"),
        "completions/truncated_frac": float(ro.truncated.mean()),
        "opsd/selected_rows": int(selected.sum()),
        "opsd/trained_tokens": int((batch["completion_mask"] & selected[:, None]).sum()),
        "opsd/empty_batches": empty_total,
        "updates": len(updates),
    })
    lp.log(step + 1, values)
    lp.maybe_checkpoint(step + 1, lambda: {"data": prompts_it.get_state(),
                                           "empty_batches": empty_total})
  lp.close()
  return lp.final_params()
