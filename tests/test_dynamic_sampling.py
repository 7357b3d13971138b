"""RLVR dynamic sampling (train/rlvr.py collect / assemble / learner_rows, rl.select_informative,
rl.refill_indices) with a scripted policy instead of the sampler: "refill" trains exactly
prompts_per_step informative groups (its GRPO gradient is that of a batch built directly from
them), hits its cap with masked filler groups and a fixed shape, "mask" and "off" build the batch
they built before refill existed, and refill prompts are a pure function of (seed, step, round)."""
import jax
import ml_collections
import numpy as np
import pytest

from opsd_jax import parallel, rl
from opsd_jax import rollouts as rollouts_lib
from opsd_jax.config import default_config
from opsd_jax.train import rlvr, steps

import helpers

CFG = helpers.tiny_config(56)
P, G = 4, 4
MAX_NEW = 24
BUCKETS = (8, 16)
PAD = 0
TRAIN = [{"question": f"q{i}", "answer": str(i), "reference": f"r{i}"} for i in range(40)]


def rlvr_cfg(mode="refill", max_refill_rounds=4):
  c = ml_collections.ConfigDict(default_config().rlvr.to_dict())
  c.group_size, c.prompts_per_step = G, P
  c.dynamic_sampling, c.max_refill_rounds = mode, max_refill_rounds
  return c


def fake_rollouts(problems, round_, informative):
  """Rollouts of a scripted policy: problem i's group is all correct unless informative(i) (then
  half its samples are); prompts, completions and lengths are a function of (i, round_).
  Completion widths differ per round (the assembly pads them)."""
  width = 12 + 4 * round_
  rows = []
  for p in problems:
    i = int(p["answer"])
    rng = np.random.default_rng((i, round_))
    prompt = rng.integers(1, CFG.vocab_size, 3 + i % 5).tolist()
    for j in range(G):
      n = int(rng.integers(1, width + 1))
      tokens = np.zeros(width, np.int32)
      tokens[:n] = rng.integers(1, CFG.vocab_size, n)
      correct = not informative(i) or j < G // 2
      rows.append((prompt, tokens, n, rng.uniform(-3, 0, width).astype(np.float32), correct))
  N = len(rows)
  return rollouts_lib.Rollouts(
      problem_ids=np.repeat(np.arange(len(problems)), G), prompt_ids=[r[0] for r in rows],
      tokens=np.stack([r[1] for r in rows]), lengths=np.array([r[2] for r in rows]),
      finished=np.ones(N, bool), sample_logprobs=np.stack([r[3] for r in rows]),
      texts=[""] * N, correct=np.array([r[4] for r in rows]),
      extracted=["x"] * N, timed_out=np.zeros(N, bool))


def scripted(c, informative=lambda i: i % 2 == 1):
  """A sample_round for rlvr.collect and the record of its calls [(round, problems, rollouts)];
  `informative` picks the problems whose groups get mixed rewards (the others: all correct)."""
  calls = []

  def sample_round(round_, problems):
    ro = fake_rollouts(problems, round_, informative)
    calls.append((round_, problems, ro))
    return ro, rlvr.group_rewards(ro, c, MAX_NEW)

  return sample_round, calls


def run_collect(c, step=3, seed=0, informative=lambda i: i % 2 == 1):
  sample_round, calls = scripted(c, informative)
  refill = lambda r: rlvr.refill_problems(TRAIN, P, seed=seed, step=step, round_=r)
  rounds = rlvr.collect(sample_round, TRAIN[:P], refill, c.dynamic_sampling, c.max_refill_rounds)
  return rounds, calls


def build(c, rounds):
  ro, r_PG, trained_P, shortfall = rlvr.assemble(rounds, c.dynamic_sampling, P)
  adv_N = np.asarray(rl.advantages(r_PG, c.advantage_scale)).reshape(-1)
  batch = rlvr.learner_rows(ro, adv_N, np.repeat(trained_P, G), max_new_tokens=MAX_NEW,
                            prompt_buckets=BUCKETS, pad_id=PAD, mask_truncated=c.mask_truncated)
  return batch, ro, r_PG, trained_P, shortfall


def expected_rounds(informative, max_refill_rounds, step=3, seed=0):
  """Rounds refill needs, and informative groups sampled, counted from the prompts alone."""
  count, rounds = sum(informative(int(p["answer"])) for p in TRAIN[:P]), 1
  while count < P and rounds <= max_refill_rounds:
    idx = rl.refill_indices(len(TRAIN), P, seed=seed, step=step, round_=rounds)
    count += sum(informative(int(TRAIN[i]["answer"])) for i in idx)
    rounds += 1
  return rounds, count


def grpo_grad(params, batch, c):
  mesh = helpers.single_device()
  batch = dict(batch)
  score = steps.make_score_fn(CFG, mesh, temperature=1.0, chunk=8)
  batch["old_logprobs"] = np.asarray(score(params, parallel.shard_batch(batch, mesh)))
  loss_fn = steps.grpo_loss(CFG, c, temperature=1.0, chunk=8, max_completion_len=MAX_NEW)
  return jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(params, batch)


@pytest.fixture(scope="module")
def params():
  return helpers.init_params(CFG)


def test_refill_trains_exactly_the_informative_groups(params):
  c = rlvr_cfg("refill", max_refill_rounds=4)
  rounds, calls = run_collect(c)
  want_rounds, sampled_informative = expected_rounds(lambda i: i % 2 == 1, 4)
  assert len(rounds) == want_rounds >= 2  # round 0 holds 2 informative groups of 4
  for round_, problems, _ in calls[1:]:  # refill prompts: the (seed, step, round) stream
    assert problems == rlvr.refill_problems(TRAIN, P, seed=0, step=3, round_=round_)
  batch, ro, r_PG, trained_P, shortfall = build(c, rounds)
  assert shortfall == 0 and trained_P.all()
  assert batch["tokens"].shape[0] == P * G
  assert np.asarray(rl.dynamic_sampling_mask(r_PG)[0]).all()
  metrics = rlvr.sampling_metrics(rounds, r_PG, trained_P, shortfall)
  assert metrics == {"dynamic_sampling/rounds": want_rounds,
                     "dynamic_sampling/prompts_sampled": P * want_rounds,
                     "dynamic_sampling/informative_groups": P,
                     "dynamic_sampling/shortfall": 0}
  assert sampled_informative >= P  # any surplus of the last round was dropped

  # The same groups, laid out directly: the first P informative ones in sampling order.
  picked = [(round_, g) for round_, problems, _ in calls for g, p in enumerate(problems)
            if int(p["answer"]) % 2 == 1][:P]
  rows = [(calls[r][2], g * G + j) for r, g in picked for j in range(G)]
  width = max(ro_.tokens.shape[1] for _, _, ro_ in calls)
  tokens = np.stack([np.pad(ro_.tokens[i], (0, width - ro_.tokens.shape[1])) for ro_, i in rows])
  lengths = np.array([ro_.lengths[i] for ro_, i in rows])
  C = rollouts_lib.completion_width(lengths, MAX_NEW)
  direct = rollouts_lib.learner_batch([ro_.prompt_ids[i] for ro_, i in rows], tokens[:, :C],
                                      lengths, BUCKETS, PAD)
  rewards = np.array([float(ro_.correct[i]) for ro_, i in rows]).reshape(P, G)
  direct["advantages"] = np.asarray(rl.advantages(rewards, "group")).reshape(-1)
  for k in ("tokens", "mask", "completion_mask"):
    np.testing.assert_array_equal(batch[k], direct[k], err_msg=k)
  np.testing.assert_allclose(batch["advantages"], direct["advantages"], rtol=1e-6)

  got, want = grpo_grad(params, batch, c), grpo_grad(params, direct, c)
  norm = sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(want))
  assert norm > 0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("max_refill_rounds", [0, 1])
def test_refill_cap_fills_masked_groups(max_refill_rounds):
  rare = lambda i: i % 10 == 1  # one informative group in round 0, few after
  c = rlvr_cfg("refill", max_refill_rounds)
  rounds, calls = run_collect(c, informative=rare)
  want_rounds, informative = expected_rounds(rare, max_refill_rounds)
  assert len(rounds) == want_rounds == 1 + max_refill_rounds and informative < P
  batch, ro, r_PG, trained_P, shortfall = build(c, rounds)
  assert shortfall == P - informative
  assert batch["tokens"].shape[0] == batch["completion_mask"].shape[0] == P * G  # jit's shape
  assert len(ro.prompt_ids) == len(ro.texts) == P * G
  np.testing.assert_array_equal(trained_P, np.arange(P) < informative)
  mask_PGC = batch["completion_mask"].reshape(P, G, -1)
  assert not mask_PGC[informative:].any()  # filler slots: no trained token
  assert mask_PGC[:informative].any(axis=(1, 2)).all()
  assert rlvr.sampling_metrics(rounds, r_PG, trained_P, shortfall) == {
      "dynamic_sampling/rounds": want_rounds,
      "dynamic_sampling/prompts_sampled": P * want_rounds,
      "dynamic_sampling/informative_groups": informative,
      "dynamic_sampling/shortfall": P - informative}


@pytest.mark.parametrize("mode", ["mask", "off"])
def test_mask_and_off_build_the_batch_of_before(mode):
  c = rlvr_cfg(mode)
  rounds, calls = run_collect(c)
  assert len(rounds) == len(calls) == 1  # no refill, whatever the groups
  batch, ro, r_PG, trained_P, shortfall = build(c, rounds)
  ro0, r0 = rounds[0]
  assert ro is ro0 and r_PG is r0 and shortfall == 0
  # The batch rlvr.py built before refill existed, written out.
  C = rollouts_lib.completion_width(ro0.lengths, MAX_NEW)
  old = rollouts_lib.learner_batch(ro0.prompt_ids, ro0.tokens[:, :C], ro0.lengths, BUCKETS, PAD)
  keep_P, _ = rl.dynamic_sampling_mask(r0)
  keep_N = np.repeat(np.asarray(keep_P), G) if mode == "mask" else np.ones(P * G, bool)
  old["completion_mask"] = old["completion_mask"] & keep_N[:, None]
  old["advantages"] = np.asarray(rl.advantages(r0, c.advantage_scale)).reshape(-1)
  for k in old:
    np.testing.assert_array_equal(batch[k], old[k], err_msg=k)
  np.testing.assert_array_equal(trained_P, [False, True, False, True] if mode == "mask"
                                else [True] * P)
  assert rlvr.sampling_metrics(rounds, r_PG, trained_P, shortfall)[
      "dynamic_sampling/informative_groups"] == 2
  key = jax.random.key(7)
  assert rlvr.round_rng(key, 0) is key  # round 0: the step's key, as before


def test_refill_stream_is_a_function_of_seed_step_round():
  draw = lambda **kw: rl.refill_indices(40, 8, **{"seed": 0, "step": 5, "round_": 1, **kw})
  np.testing.assert_array_equal(draw(), draw())
  for other in (dict(seed=1), dict(step=6), dict(round_=2)):
    assert not np.array_equal(draw(), draw(**other)), other
  idx = draw()
  assert len(set(idx.tolist())) == 8 and idx.min() >= 0 and idx.max() < 40  # no repeats
  assert len(rl.refill_indices(3, 8, seed=0, step=0, round_=1)) == 8  # fewer records: repeats
  assert rlvr.refill_problems(TRAIN, 8, seed=0, step=5, round_=1) == [TRAIN[i] for i in idx]
  keys = [rlvr.round_rng(jax.random.key(0), r) for r in range(3)]
  data = [np.asarray(jax.random.key_data(k)).tolist() for k in keys]
  assert len({str(d) for d in data}) == 3


def test_select_informative():
  groups, shortfall = rl.select_informative([[False, True, False, True], [True, True, False]], 3)
  np.testing.assert_array_equal(groups, [1, 3, 4])  # round 1's surplus group 5 dropped
  assert shortfall == 0
  groups, shortfall = rl.select_informative([[False, True, False], [False]], 3)
  np.testing.assert_array_equal(groups, [1, 0, 2])  # fillers: the earliest uninformative
  assert shortfall == 2
  with pytest.raises(ValueError, match="needed"):
    rl.select_informative([[False, False]], 3)
