"""Stage 2, RLVR (GRPO family): sample G completions per prompt -> verify -> advantages ->
mu x mini-batch updates. Every knob is METHOD.md's; the step itself is train/steps.py's.

With mu = 1 (updates_per_batch) the ratio is exactly 1 at the update, so the loss value sits near
0 while its gradient (the advantage-weighted log-prob gradient) does not: that is expected.

Dynamic sampling (rlvr.dynamic_sampling, rl.DYNAMIC_SAMPLING): a group whose rewards are all equal
has zero advantages, hence no gradient. "refill" (DAPO) drops such groups and samples further
rounds of prompts_per_step prompts, at most max_refill_rounds of them, until prompts_per_step
groups have mixed rewards (`collect`, `assemble`); the learner batch keeps its shape, slots the cap
left empty hold masked groups. Refill prompts come from rl.refill_indices, a pure function of
(seed, step, round), never from the prompt iterator whose position a checkpoint saves, so resume
stays exact. "mask" keeps the step's groups and masks the all-equal ones; "off" trains them all.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from opsd_jax import data, parallel, rl
from opsd_jax import rollouts as rollouts_lib
from opsd_jax.train import loop, steps

# Refill round r samples with fold_in(fold_in(step key, _REFILL_TAG), r): a tag far above the
# batch indices sample_and_grade folds into the key it is given.
_REFILL_TAG = 0x7EF111


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
    # COLLECT ROLLOUTS: G per prompt; global rows, each process read its own. "refill": further
    # rounds on refill prompts while fewer than P groups have mixed rewards (see `collect`).
    problems = parallel.gather_rows(prompts)
    key = lp.next_rng(step)

    def sample_round(round_, round_problems):
      ro = rollouts_lib.sample_and_grade(
          lp.sampler, lp.model_params(), round_problems, num_samples=c.group_size,
          temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
          max_new_tokens=s.max_new_tokens, rng=round_rng(key, round_))
      return ro, group_rewards(ro, c, s.max_new_tokens)

    rounds = collect(sample_round, problems,
                     lambda round_: refill_problems(run.train, len(problems), seed=cfg.seed,
                                                    step=step, round_=round_),
                     c.dynamic_sampling, c.max_refill_rounds)

    # REWARDS AND ADVANTAGES (rewards graded per round in `collect`): the groups trained, and
    # their advantages; "batch" scaling takes the std over this assembled batch, not per round.
    ro, r_PG, trained_P, shortfall = assemble(rounds, c.dynamic_sampling, len(problems))
    adv_N = np.asarray(rl.advantages(r_PG, c.advantage_scale)).reshape(-1)

    # LEARNER BATCH: trained tokens, then old (and reference) log-probs of the learner
    batch = learner_rows(ro, adv_N, np.repeat(trained_P, c.group_size),
                         max_new_tokens=s.max_new_tokens, prompt_buckets=s.prompt_buckets,
                         pad_id=run.tok.pad_id, mask_truncated=c.mask_truncated)
    completion_mask = batch["completion_mask"]
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

    # METRICS: rollout figures (reward, accuracy, lengths, ...) describe round 0, the policy on
    # the step's own prompts, comparable with "mask" / "off"; refill rounds keep only what they
    # need, which would bias them. The trained batch gives trained_tokens and the mismatch.
    ro0, r0 = rounds[0]
    C = completion_mask.shape[1]
    trained = completion_mask.astype(bool)
    mismatch = np.abs(ro.sample_logprobs[:, :C] - batch["old_logprobs"])[trained]
    values = loop.mean_metrics(updates)
    values.update({
        "reward/mean": float(r0.mean()), "reward/std": float(r0.std()),
        "accuracy": float(ro0.correct.mean()),
        "groups/frac_zero_std": float(rl.dynamic_sampling_mask(r0)[1]),
        "completions/mean_length": float(ro0.lengths.mean()),
        "completions/max_length": int(ro0.lengths.max()),
        "completions/truncated_frac": float(ro0.truncated.mean()),
        "verify/timed_out": int(ro0.timed_out.sum()),
        "updates": len(updates),
        "trained_tokens": int(trained.sum()),
        # sampler (top-k/top-p truncated) vs learner log-probs: METHOD.md's trap, logged
        "sampler/logprob_abs_diff": float(mismatch.mean()) if mismatch.size else 0.0,
        **sampling_metrics(rounds, r_PG, trained_P, shortfall),
    })
    return values

  return lp.train(prompts_it, body)


# ----------------------------------------------------------------------------------------------
# One step's groups: sampling rounds, the batch assembled from them, its learner rows
# ----------------------------------------------------------------------------------------------

def round_rng(step_key, round_: int):
  """Round 0 samples with the step's key itself (so "mask" and "off" runs are those of before
  refill existed); refill round r with a key folded from it (see _REFILL_TAG)."""
  if round_ == 0:
    return step_key
  return jax.random.fold_in(jax.random.fold_in(step_key, _REFILL_TAG), round_)


def refill_problems(train, count: int, *, seed: int, step: int, round_: int) -> list[dict]:
  """The problems of refill round `round_` of `step` (global, the same on every process): records
  of `train` at rl.refill_indices, decoded as the prompt iterator decodes them."""
  idx = rl.refill_indices(len(train), count, seed=seed, step=step, round_=round_)
  return [data.decode_record(train[int(i)]) for i in idx]


def group_rewards(ro, c, max_new_tokens: int) -> np.ndarray:
  """Rewards [P, G] of one round's rollouts, by the rlvr section's reward settings."""
  return rl.rewards(ro.correct, [a is not None for a in ro.extracted], ro.lengths,
                    max_len=max_new_tokens, format_reward=c.format_reward,
                    overlong_buffer=c.overlong_buffer, overlong_coef=c.overlong_penalty
                    ).reshape(-1, c.group_size)


def _informative(rewards_PG) -> np.ndarray:
  return np.asarray(rl.dynamic_sampling_mask(rewards_PG)[0])


def collect(sample_round, problems, refill, mode: str, max_refill_rounds: int) -> list:
  """The sampling rounds of one step, [(rollouts, rewards [p, G])]: round 0 on the step's
  problems; with mode "refill", round r = 1, 2, ... on refill(r) while fewer than len(problems)
  groups of all rounds have mixed rewards and r <= max_refill_rounds.
  sample_round(round, problems) -> (rollouts, rewards)."""
  rounds = [sample_round(0, problems)]
  while (mode == "refill" and len(rounds) <= max_refill_rounds
         and sum(int(_informative(r).sum()) for _, r in rounds) < len(problems)):
    rounds.append(sample_round(len(rounds), refill(len(rounds))))
  return rounds


def assemble(rounds, mode: str, num_groups: int):
  """The learner's groups from the sampling rounds: (rollouts, rewards [P, G], trained_P bool,
  shortfall). refill: rl.select_informative over all rounds, its filler slots (shortfall, the cap
  was hit) not trained; mask: round 0, its all-equal-reward groups not trained; off: round 0."""
  ro0, r0 = rounds[0]
  if mode != "refill":
    trained = _informative(r0) if mode == "mask" else np.ones(len(r0), bool)
    return ro0, r0, trained, 0
  groups, shortfall = rl.select_informative([_informative(r) for _, r in rounds], num_groups)
  rewards = np.concatenate([r for _, r in rounds])[groups]
  ro = take_groups([ro for ro, _ in rounds], groups, rewards.shape[1])
  return ro, rewards, np.arange(num_groups) < num_groups - shortfall, shortfall


def take_groups(rounds, groups, group_size: int) -> rollouts_lib.Rollouts:
  """Rollouts of the groups `groups` (indices over the groups of all `rounds`, concatenated in
  order); [N, C] arrays padded to the widest round, problem_ids offset to index the rounds'
  problems concatenated."""
  rows = (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).reshape(-1)
  width = max(r.tokens.shape[1] for r in rounds)
  offsets = np.cumsum([0] + [len(r.lengths) // group_size for r in rounds[:-1]])
  fields = {}
  for f in dataclasses.fields(rollouts_lib.Rollouts):
    parts = [getattr(r, f.name) for r in rounds]
    if f.name == "problem_ids":
      parts = [p + o for p, o in zip(parts, offsets)]
    if isinstance(parts[0], list):
      flat = [x for p in parts for x in p]
      fields[f.name] = [flat[i] for i in rows]
      continue
    parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) if p.ndim == 2 else p for p in parts]
    fields[f.name] = np.concatenate(parts)[rows]
  return rollouts_lib.Rollouts(**fields)


def learner_rows(ro, adv_N, trained_N, *, max_new_tokens: int, prompt_buckets, pad_id: int,
                 mask_truncated: bool) -> dict[str, np.ndarray]:
  """The host learner batch of `ro` (rollouts.learner_batch, completions trimmed to
  completion_width) with advantages; rows not in trained_N, and with mask_truncated those that
  did not finish, train no token."""
  C = rollouts_lib.completion_width(ro.lengths, max_new_tokens)
  batch = rollouts_lib.learner_batch(ro.prompt_ids, ro.tokens[:, :C], ro.lengths,
                                     prompt_buckets, pad_id)
  completion_mask = batch["completion_mask"] & np.asarray(trained_N, bool)[:, None]
  if mask_truncated:
    completion_mask = rl.mask_truncated(completion_mask, ro.finished)
  batch["completion_mask"] = completion_mask
  batch["advantages"] = np.asarray(adv_N).astype(np.float32)
  return batch


def sampling_metrics(rounds, rewards_PG, trained_P, shortfall: int) -> dict[str, int]:
  """dynamic_sampling/*: rounds used (1 = no refill), prompts sampled, informative groups in the
  trained batch, slots filled with masked groups because the refill cap was hit."""
  return {
      "dynamic_sampling/rounds": len(rounds),
      "dynamic_sampling/prompts_sampled": sum(len(r) for _, r in rounds),
      "dynamic_sampling/informative_groups": int((_informative(rewards_PG) & trained_P).sum()),
      "dynamic_sampling/shortfall": int(shortfall),
  }
