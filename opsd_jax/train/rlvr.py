"""Stage 2, RLVR (GRPO family): sample G completions per prompt -> verify -> advantages ->
mu x mini-batch updates. Every knob is METHOD.md's; the step itself is train/steps.py's.

With mu = 1 (updates_per_batch) the ratio is exactly 1 at the update, so the loss value sits near
0 while its gradient (the advantage-weighted log-prob gradient) does not: that is expected.
"""
from __future__ import annotations

import numpy as np

from opsd_jax import data, parallel, rl
from opsd_jax import rollouts as rollouts_lib
from opsd_jax.train import loop, steps


def train(run, params):
  cfg, c, s = run.cfg, run.cfg.rlvr, run.cfg.sampling
  if c.steps == 0:
    return params
  lp = loop.StageLoop(run, "rlvr", params, total_steps=c.steps, learning_rate=c.learning_rate,
                      updates_per_step=c.updates_per_batch * c.mini_batches)
  prompts_it = data.record_batches(run.train, c.prompts_per_step, seed=cfg.seed + 1)
  options = steps.grpo_options(cfg)
  step_fn = steps.make_grpo_step(lp.model_cfg, c, lp.optimizer, run.mesh, **options,
                                 shardings=lp.shardings)
  score = steps.make_score_fn(lp.model_cfg, run.mesh, temperature=options["temperature"],
                              chunk=options["chunk"], shardings=lp.shardings)
  # The stage's starting point, never donated (with LoRA: the base alone, adapters off).
  ref_params = params if c.kl_beta > 0 else None

  def body(step, prompts):
    # COLLECT ROLLOUTS: G per prompt; global rows, each process read its own
    problems = parallel.gather_rows(prompts)
    ro = rollouts_lib.sample_and_grade(
        lp.sampler, lp.model_params(), problems, num_samples=c.group_size,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
        rng=lp.next_rng(step))

    # REWARDS AND ADVANTAGES
    r_PG = rl.rewards(ro.correct, [a is not None for a in ro.extracted], ro.lengths,
                      max_len=s.max_new_tokens, format_reward=c.format_reward,
                      overlong_buffer=c.overlong_buffer, overlong_coef=c.overlong_penalty
                      ).reshape(len(problems), c.group_size)
    adv_N = np.asarray(rl.advantages(r_PG, c.advantage_scale)).reshape(-1)
    keep_P, frac_zero_std = rl.dynamic_sampling_mask(r_PG)
    keep_N = np.repeat(np.asarray(keep_P), c.group_size) if c.dynamic_sampling else \
        np.ones(len(adv_N), bool)

    # LEARNER BATCH: trained tokens, then old (and reference) log-probs of the learner
    C = rollouts_lib.completion_width(ro.lengths, s.max_new_tokens)
    batch = rollouts_lib.learner_batch(ro.prompt_ids, ro.tokens[:, :C], ro.lengths,
                                       s.prompt_buckets, run.tok.pad_id)
    completion_mask = batch["completion_mask"] & keep_N[:, None]
    if c.mask_truncated:
      completion_mask = rl.mask_truncated(completion_mask, ro.finished)
    batch["completion_mask"] = completion_mask
    batch["advantages"] = adv_N.astype(np.float32)
    # Host batches are global on every process (same decisions everywhere); each feeds its rows.
    device_batch = parallel.shard_global_batch(batch, run.mesh)
    batch["old_logprobs"] = parallel.to_host(score(lp.model_params(), device_batch))
    if ref_params is not None:
      batch["ref_logprobs"] = parallel.to_host(score(ref_params, device_batch))

    # UPDATE: mu passes over the mini-batches
    updates = []
    for _ in range(c.updates_per_batch):
      for mb in loop.split_rows(batch, c.mini_batches):
        if not mb["completion_mask"].any():  # every group of it had equal rewards: no gradient
          continue
        lp.state, m = step_fn(lp.state, parallel.shard_global_batch(mb, run.mesh))
        updates.append(m)

    # METRICS
    trained = completion_mask.astype(bool)
    mismatch = np.abs(ro.sample_logprobs[:, :C] - batch["old_logprobs"])[trained]
    values = loop.mean_metrics(updates)
    values.update({
        "reward/mean": float(r_PG.mean()), "reward/std": float(r_PG.std()),
        "accuracy": float(ro.correct.mean()),
        "groups/frac_zero_std": float(frac_zero_std),
        "completions/mean_length": float(ro.lengths.mean()),
        "completions/max_length": int(ro.lengths.max()),
        "completions/truncated_frac": float(ro.truncated.mean()),
        "verify/timed_out": int(ro.timed_out.sum()),
        "updates": len(updates),
        "trained_tokens": int(trained.sum()),
        # sampler (top-k/top-p truncated) vs learner log-probs: METHOD.md's trap, logged
        "sampler/logprob_abs_diff": float(mismatch.mean()) if mismatch.size else 0.0,
    })
    return values

  return lp.train(prompts_it, body)
