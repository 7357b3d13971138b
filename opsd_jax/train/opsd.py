"""Stage 3, OPSD: the student samples on-policy -> verify -> rollout filter -> the teacher (the
same model with the reference solution in its context) scores the same tokens -> token-level
distillation. The teacher's parameters are a snapshot taken when the stage starts (frozen), an EMA
of the student, or the student itself under stop-gradient (current).
"""
from __future__ import annotations

import numpy as np

from opsd_jax import data, losses, parallel
from opsd_jax import prompts as prompts_lib
from opsd_jax import rollouts as rollouts_lib
from opsd_jax.train import loop, steps


def teacher_prompts(run, problems, rows) -> list[list[int]]:
  """The teacher's prompt ids in its own thinking mode; a thinking-on teacher of a thinking-off
  student ends with opsd.teacher_thought, closed (prompts.py's module doc)."""
  settings = prompts_lib.teacher_settings(run.cfg.opsd)
  return [prompts_lib.teacher(run.tok, run.template, problems[i]["question"],
                              problems[i]["reference"], answer=problems[i]["answer"], **settings)
          for i in rows]


def train(run, params):
  cfg, o, s = run.cfg, run.cfg.opsd, run.cfg.sampling
  if o.steps == 0:
    return params
  lp = loop.StageLoop(run, "opsd", params, total_steps=o.steps, learning_rate=o.learning_rate,
                      updates_per_step=o.mini_batches, teacher=o.teacher)
  prompts_it = data.record_batches(run.train, o.prompts_per_step, seed=cfg.seed + 2)
  step_fn = steps.make_opsd_step(lp.model_cfg, o, lp.optimizer, run.mesh, chunk=cfg.loss_chunk,
                                 shardings=lp.shardings)

  def body(step, prompts):
    # COLLECT ROLLOUTS: the student's, in its own thinking mode
    problems = parallel.gather_rows(prompts)  # global: each process read its rows
    ro = rollouts_lib.sample_and_grade(
        lp.sampler, lp.model_params(), problems, num_samples=o.rollouts_per_prompt,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        max_new_tokens=s.max_new_tokens, rng=lp.next_rng(step), thinking=o.student_thinking)

    # TEACHER CONTEXT: the same completion tokens after the teacher's prompt
    tokens = ro.tokens[:, :rollouts_lib.completion_width(ro.lengths, s.max_new_tokens)]
    batch = rollouts_lib.learner_batch(ro.prompt_ids, tokens, ro.lengths, s.prompt_buckets,
                                       run.tok.pad_id)
    t = rollouts_lib.learner_batch(teacher_prompts(run, problems, ro.problem_ids), tokens,
                                   ro.lengths, s.prompt_buckets, run.tok.pad_id)
    batch.update(teacher_tokens=t["tokens"], teacher_mask=t["mask"], correct=ro.correct)

    # FILTER AND UPDATE: a mini-batch the filter leaves empty is a defined no-op, no update
    selected = losses.rollout_selection(o.rollout_filter, ro.correct)
    updates, empty = [], 0
    for mb, sel in zip(loop.split_rows(batch, o.mini_batches),
                       np.array_split(selected, o.mini_batches)):
      if not sel.any():
        empty += 1
        continue
      lp.state, m = step_fn(lp.state, parallel.shard_global_batch(mb, run.mesh))
      updates.append(m)
    lp.carry["empty_batches"] += empty

    # METRICS
    values = loop.mean_metrics(updates)
    values.update({
        "accuracy": float(ro.correct.mean()),
        "completions/mean_length": float(ro.lengths.mean()),
        "completions/mean_length_correct": float(ro.lengths[ro.correct].mean())
        if ro.correct.any() else float("nan"),
        "completions/truncated_frac": float(ro.truncated.mean()),
        "opsd/selected_rows": int(selected.sum()),
        "opsd/trained_tokens": int((batch["completion_mask"] & selected[:, None]).sum()),
        "opsd/empty_batches": lp.carry["empty_batches"],
        "updates": len(updates),
    })
    return values

  return lp.train(prompts_it, body, carry={"empty_batches": 0})
