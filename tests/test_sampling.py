"""Sampler: greedy parity with transformers, sampling distribution vs a numpy reference, group
prefill, continuous = static batching, 1 device = 8-device mesh, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from opsd_jax import hf, kv_cache, model, padding, parallel, sampler_loop, sampling
from opsd_jax import token_sampling
from opsd_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64)


@pytest.fixture(scope="module")
def params():
  # Larger than the default init so the next-token distributions are far from uniform.
  p = model.init(CFG, jax.random.key(0))
  return jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, p)


def homogeneity_p_value(counts_2K):
  """Chi-square test that two samples of counts come from the same categorical distribution."""
  counts_2K = counts_2K[:, counts_2K.sum(0) > 0]
  expected = counts_2K.sum(1, keepdims=True) * counts_2K.sum(0, keepdims=True) / counts_2K.sum()
  stat = ((counts_2K - expected) ** 2 / expected).sum()
  return scipy.stats.chi2.sf(stat, counts_2K.shape[1] - 1)


def reference_probs(logits, temperature, top_k, top_p):
  """Truncated sampling distribution, the way transformers' warpers define it (numpy, sorted)."""
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(x, bool)
  if top_k:
    keep &= x >= np.sort(x)[::-1][min(top_k, x.size) - 1]
  p = np.where(keep, np.exp(x - x.max()), 0)
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p, kind="stable")
    mass_above = np.cumsum(p[order]) - p[order]
    drop = order[mass_above >= top_p]
    p[drop] = 0
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 0, 1.0),    # plain: inverse CDF over the whole vocabulary
    (1.3, 5, 1.0),    # top-k tournament
    (1.0, 20, 0.6),   # tournament + top-p on the sorted k
    (1.0, 0, 0.8),    # top-p alone: threshold bisection
    (1.0, 100, 0.9),  # large k: bisection for both thresholds
])
def test_sample_logits_distribution(temperature, top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(1), (300,)) * 2.5)
  n = 40_000
  u = jax.random.uniform(jax.random.key(2), (n,))
  token, logprob, learner = jax.jit(
      lambda l, u: token_sampling.sample_logits(l, u, temperature, top_k, top_p))(
          jnp.broadcast_to(logits, (n, logits.size)), u)
  token = np.asarray(token)
  ref = reference_probs(logits, temperature, top_k, top_p)
  freq = np.bincount(token, minlength=logits.size) / n
  assert ref[token].min() > 0, "sampled a token outside the truncated set"
  assert 0.5 * np.abs(freq - ref).sum() < 0.03
  np.testing.assert_allclose(np.asarray(logprob), np.log(ref[token]), atol=1e-4)
  untruncated = logits / temperature - np.log(np.exp(logits / temperature).sum())
  np.testing.assert_allclose(np.asarray(learner), untruncated[token], atol=1e-4)


def test_greedy_matches_transformers(tmp_path):
  hf_cfg = transformers.Qwen3Config(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
      initializer_range=0.2, rms_norm_eps=1e-6, rope_theta=10000.0,
      max_position_embeddings=512)
  torch.manual_seed(0)
  hf_model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
  hf_model.save_pretrained(tmp_path)
  cfg, p = hf.load(str(tmp_path))
  prompts = [[5, 17, 3], [9, 2, 44, 61, 7, 7, 30], [88, 1, 12, 40, 3, 5, 6, 9, 11, 70, 2, 19]]
  out = sampling.generate(cfg, p, prompts, rng=jax.random.key(0), max_new_tokens=64,
                          temperature=0.0, prompt_buckets=(16,))
  for i, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64,
                              min_new_tokens=64, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(out.tokens[i], ref[0, len(prompt):].numpy(), err_msg=f"row {i}")
  assert (out.lengths == 64).all() and not out.finished.any()
  assert (out.logprobs == 0).all()


def test_per_layer_cache_matches_full_forward_and_phases_match_one_phase(params):
  # The decode loop's form: unstacked weights, one cache buffer per layer, left-padded rows.
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 9), 1, CFG.vocab_size))
  mask = np.ones((2, 9), bool)
  mask[1, :3] = False  # row 1: 3 pad tokens on the left
  positions = model.positions_from_mask(jnp.asarray(mask))
  full = model.forward(CFG, params, tokens, mask_BT=mask)
  per_layer = model.unstack_layers(params)
  cache = kv_cache.init_cache(CFG, 2, 9, per_layer=True)
  kv = jnp.asarray(mask[:, :6])
  logits, cache = model.forward_cached(CFG, per_layer, tokens[:, :6], positions[:, :6], cache,
                                       jnp.zeros(2, jnp.int32), jnp.pad(kv, ((0, 0), (0, 3))))
  steps = [logits]
  for t in range(6, 9):
    logits, cache = model.forward_cached(CFG, per_layer, tokens[:, t:t + 1], positions[:, t:t + 1],
                                         cache, jnp.full(2, t, jnp.int32), jnp.asarray(mask))
    steps.append(logits)
  got = np.concatenate(steps, 1)
  np.testing.assert_allclose(got[mask], np.asarray(full)[mask], atol=2e-4, rtol=2e-4)
  # A static batch that grows its cache in phases = continuous batching (one full-length phase).
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  assert len(sampler_loop.phase_ends(70, grow_cache=True)) > 2
  kw = dict(rng=jax.random.key(0), max_new_tokens=70, temperature=0.0, prompt_buckets=(8,))
  grown = sampling.generate(CFG, params, prompts, **kw)
  one_phase = sampling.generate(CFG, params, prompts, continuous_batching=True, num_slots=2, **kw)
  np.testing.assert_array_equal(grown.tokens, one_phase.tokens)


def test_generate_first_token_distribution_and_groups(params):
  prompts = [[3, 4, 5, 6], [7, 8]]
  out = sampling.generate(CFG, params, prompts, rng=jax.random.key(3), max_new_tokens=2,
                          temperature=0.9, top_k=8, top_p=0.9, num_samples=3000,
                          return_learner_logprobs=True, prompt_buckets=(8,))
  assert out.num_prefills == 2  # one per distinct prompt, not per sample
  assert out.tokens.shape == (6000, 2)
  for i, prompt in enumerate(prompts):
    logits = np.asarray(model.forward(CFG, params, jnp.asarray([prompt]))[0, -1])
    ref = reference_probs(logits, 0.9, 8, 0.9)
    first = out.tokens[i * 3000:(i + 1) * 3000, 0]  # prompt-major rows
    freq = np.bincount(first, minlength=CFG.vocab_size) / first.size
    assert 0.5 * np.abs(freq - ref).sum() < 0.05, f"prompt {i}"
    np.testing.assert_allclose(out.logprobs[i * 3000:(i + 1) * 3000, 0], np.log(ref[first]),
                               atol=1e-4)
    full = logits / 0.9 - np.log(np.exp(logits / 0.9).sum())
    np.testing.assert_allclose(out.learner_logprobs[i * 3000:(i + 1) * 3000, 0], full[first],
                               atol=1e-4)


def test_greedy_continuation_matches_full_recompute_and_dedups(params):
  prompts = [[1, 2, 3], [10, 20, 30, 40, 50], [1, 2, 3]]
  out = sampling.generate(CFG, params, prompts, rng=jax.random.key(0), max_new_tokens=12,
                          temperature=0.0, num_samples=2, prompt_buckets=(8,))
  assert out.num_prefills == 2
  forward = jax.jit(lambda tokens: model.forward(CFG, params, tokens))
  for i, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(12):  # reference: argmax of the uncached forward over the whole sequence
      right_padded = jnp.asarray([seq + [0] * (24 - len(seq))])  # causal: padding after is inert
      seq.append(int(jnp.argmax(forward(right_padded)[0, len(seq) - 1])))
    for s in range(2):
      np.testing.assert_array_equal(out.tokens[2 * i + s], seq[len(prompt):])


def test_eos_stops_rows_and_pads(params):
  out = sampling.generate(CFG, params, [[1, 2, 3]], rng=jax.random.key(5), max_new_tokens=40,
                          temperature=1.0, num_samples=64, eos_ids=tuple(range(0, 64, 4)),
                          prompt_buckets=(8,))
  eos = set(range(0, 64, 4))
  for row, lp, n, fin in zip(out.tokens, out.logprobs, out.lengths, out.finished):
    hits = [t for t, tok in enumerate(row[:n]) if int(tok) in eos]
    assert fin == bool(hits) and (not fin or hits == [n - 1])  # stops at the first EOS, kept
    assert (row[n:] == 0).all() and (lp[n:] == 0).all() and (lp[:n] < 0).all()
  assert out.finished.any() and out.lengths.max() <= 40


def test_continuous_batching_equals_static(params):
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
  kw = dict(max_new_tokens=30, prompt_buckets=(8,), eos_ids=tuple(range(0, 64, 6)))
  # Greedy: the same tokens, whatever slot a row ran in.
  static = sampling.generate(CFG, params, prompts, rng=jax.random.key(0), temperature=0.0,
                             num_samples=2, **kw)
  cont = sampling.generate(CFG, params, prompts, rng=jax.random.key(0), temperature=0.0,
                           num_samples=2, continuous_batching=True, num_slots=3, **kw)
  np.testing.assert_array_equal(cont.tokens, static.tokens)
  np.testing.assert_array_equal(cont.lengths, static.lengths)
  # Sampling: the same distribution of first tokens and of lengths; every row completes.
  static = sampling.generate(CFG, params, prompts, rng=jax.random.key(1), num_samples=500, **kw)
  cont = sampling.generate(CFG, params, prompts, rng=jax.random.key(2), num_samples=500,
                           continuous_batching=True, num_slots=16, **kw)
  assert cont.num_prefills == 4
  assert (cont.lengths >= 1).all()
  assert (cont.finished | (cont.lengths == 30)).all()
  for i in range(4):
    rows = slice(i * 500, (i + 1) * 500)
    counts = np.stack([np.bincount(out.tokens[rows, 0], minlength=64) for out in (static, cont)])
    assert homogeneity_p_value(counts) > 1e-4, f"prompt {i}: first-token distributions differ"
    # lengths: means within ~4 standard errors
    se = np.sqrt(static.lengths[rows].var() / 500 + cont.lengths[rows].var() / 500)
    assert abs(static.lengths[rows].mean() - cont.lengths[rows].mean()) < 4 * se + 1e-6


def test_mesh_matches_single_device_and_is_deterministic(params):
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
  kw = dict(max_new_tokens=16, temperature=1.0, top_k=10, num_samples=3, prompt_buckets=(8,),
            eos_ids=(5,), return_learner_logprobs=True)
  single = sampling.generate(CFG, params, prompts, rng=jax.random.key(7), **kw)
  again = sampling.generate(CFG, params, prompts, rng=jax.random.key(7), **kw)
  np.testing.assert_array_equal(single.tokens, again.tokens)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = sampling.generate(CFG, params, prompts, rng=jax.random.key(7), mesh=mesh, **kw)
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_array_equal(sharded.lengths, single.lengths)
  np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-4)
  cont = sampling.generate(CFG, params, prompts, rng=jax.random.key(7), mesh=mesh,
                           continuous_batching=True, num_slots=4, **kw)
  assert (cont.finished | (cont.lengths == 16)).all()
  other = sampling.generate(CFG, params, prompts, rng=jax.random.key(8), **kw)
  assert not np.array_equal(other.tokens, single.tokens)


def test_pad_prompts():
  ids, mask = padding.pad_prompts([[5, 6], [7, 8, 9]], buckets=(2, 4, 8))
  np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 7, 8, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])


@pytest.mark.parametrize("prompts,kw,match", [
    ([[1, 2], []], {}, r"prompts\[1\] is empty"),
    ([[1] * 9], {}, "longer than the largest prompt bucket"),
    ([[1, 2]], {"num_samples": 0}, "num_samples"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"top_p": 1.5}, "top_p"),
    ([[1, 64]], {}, "outside the vocabulary"),
    ([[-1, 2]], {}, "outside the vocabulary"),
    ([[1, 2]], {"temperature": -0.5}, "temperature"),
    ([[1, 2]], {"top_k": -1}, "top_k"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([], {}, "empty list"),
])
def test_bad_input(params, prompts, kw, match):
  args = dict(rng=jax.random.key(0), max_new_tokens=4, prompt_buckets=(8,))
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    sampling.generate(CFG, params, prompts, **args)
