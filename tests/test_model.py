"""model: KV-cached decoding equals the full forward; packing equals separate sequences; remat
policies agree; bf16 runs. (Logit parity with transformers is in test_hf.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import kernels, kv_cache, model
from opsd_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  mlp_dim=80, qkv_bias=True, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def params():
  @jax.jit
  def make():
    p = model.init(CFG, jax.random.key(0))
    # Larger weights than the init so the logits vary a lot with position and context.
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)
  return make()


forward = jax.jit(model.forward, static_argnums=0)
forward_cached = jax.jit(model.forward_cached, static_argnums=0)


def _tokens(shape, seed):
  return np.random.default_rng(seed).integers(1, CFG.vocab_size, shape).astype(np.int32)


def test_cached_decode_left_padded_equals_full_forward(params):
  """Prefill a left-padded prompt block, then decode one token at a time (teacher-forced)."""
  B, P, new = 3, 7, 5
  prompt_lens = np.array([7, 4, 2])
  tokens = _tokens((B, P + new), seed=2)
  mask = np.ones((B, P + new), bool)
  for b, n in enumerate(prompt_lens):
    mask[b, :P - n] = False
    tokens[b, :P - n] = 0
  full = np.asarray(forward(CFG, params, tokens, mask))

  S = P + new
  cache = kv_cache.init_cache(CFG, B, S)
  kv_mask = np.zeros((B, S), bool)
  kv_mask[:, :P] = mask[:, :P]
  positions = np.asarray(model.positions_from_mask(mask))
  logits, cache = forward_cached(CFG, params, tokens[:, :P], positions[:, :P], cache,
                                 jnp.zeros(B, jnp.int32), kv_mask)
  real = mask[:, :P]
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :P][real], atol=1e-5, rtol=1e-5)
  for t in range(P, S):
    kv_mask[:, t] = True
    logits, cache = forward_cached(CFG, params, tokens[:, t:t + 1], positions[:, t:t + 1], cache,
                                   jnp.full(B, t, jnp.int32), kv_mask)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_prefill_in_query_blocks_then_decode_equals_full_forward(params):
  """A long left-padded prompt prefilled into a cache of exactly its width (the sampler's prefill:
  attention in causal query blocks), the cache then grown and decoded (teacher-forced): the full
  forward's logits at every real position."""
  B, P, new = 3, 160, 3
  tokens = _tokens((B, P + new), seed=5)
  mask = np.ones((B, P + new), bool)
  for b, n in enumerate([160, 100, 30]):
    mask[b, :P - n] = False
    tokens[b, :P - n] = 0
  full = np.asarray(forward(CFG, params, tokens, mask))
  positions = np.asarray(model.positions_from_mask(mask))
  cache = kv_cache.init_cache(CFG, B, P, per_layer=True)
  logits, cache = forward_cached(CFG, params, tokens[:, :P], positions[:, :P], cache,
                                 jnp.zeros(B, jnp.int32), mask[:, :P])
  real = mask[:, :P]
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :P][real], atol=1e-5, rtol=1e-5)
  cache = {name: tuple(jnp.pad(x, kv_cache.along_cache_slots(name, (0, new), (0, 0), (0, 0)))
                       for x in bufs)
           for name, bufs in cache.items()}
  for t in range(P, P + new):
    logits, cache = forward_cached(CFG, params, tokens[:, t:t + 1], positions[:, t:t + 1], cache,
                                   jnp.full(B, t, jnp.int32), mask)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_prefill_in_chunks_into_a_filled_cache_equals_full_forward(params):
  """T > 1 new tokens at cache_pos > 0 (a chunked prefill): they attend to the cache as it was and,
  causally, to each other; rows at different positions, one left-padded. Then one decode step.
  The middle chunk is head_dim (16) tokens long: only a chunk as long as the cache is a prefill."""
  B, S = 2, 22
  tokens = _tokens((B, S), seed=7)
  mask = np.ones((B, S), bool)
  mask[1, :3] = False
  tokens[1, :3] = 0
  full = np.asarray(forward(CFG, params, tokens, mask))
  positions = np.asarray(model.positions_from_mask(mask))
  cache = kv_cache.init_cache(CFG, B, S, per_layer=True)
  kv_mask = np.zeros((B, S), bool)
  for start, end in ((0, 5), (5, 21), (21, 22)):
    kv_mask[:, start:end] = mask[:, start:end]
    logits, cache = forward_cached(CFG, params, tokens[:, start:end], positions[:, start:end],
                                   cache, jnp.full(B, start, jnp.int32), kv_mask)
    real = mask[:, start:end]
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, start:end][real], atol=1e-5,
                               rtol=1e-5)


def test_cached_decode_per_row_cache_positions(params):
  """Prompts written left-aligned (right padding in the prefill); each row decodes at its own
  slot, overwriting the padding slots. Reference: the right-padded full sequences, whose real
  tokens never see the padding after them."""
  B, P, new = 3, 7, 5
  lens = np.array([7, 4, 2])
  full_tokens = np.zeros((B, P + new), np.int32)
  full_mask = np.zeros((B, P + new), bool)
  for b, n in enumerate(lens):
    full_tokens[b, :n + new] = _tokens((n + new,), seed=10 + b)
    full_mask[b, :n + new] = True
  ref = np.asarray(forward(CFG, params, full_tokens, full_mask))

  kv_mask = np.zeros((B, P + new), bool)
  kv_mask[:, :P] = full_mask[:, :P] & (np.arange(P)[None] < lens[:, None])
  prompt = np.where(kv_mask[:, :P], full_tokens[:, :P], 0)
  cache = kv_cache.init_cache(CFG, B, P + new)
  positions = np.tile(np.arange(P, dtype=np.int32), (B, 1))
  logits, cache = forward_cached(CFG, params, prompt, positions, cache, jnp.zeros(B, jnp.int32),
                                 kv_mask)
  for b, n in enumerate(lens):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], ref[b, :n], atol=1e-5, rtol=1e-5)
  for t in range(new):
    slot = (lens + t).astype(np.int32)
    kv_mask[np.arange(B), slot] = True
    step_tokens = full_tokens[np.arange(B), slot][:, None]
    logits, cache = forward_cached(CFG, params, step_tokens, slot[:, None], cache,
                                   jnp.asarray(slot), kv_mask)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], ref[np.arange(B), slot],
                               atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_sequences(params):
  lens = [5, 7, 3]
  seqs = [_tokens((1, n), seed=20 + i)[0] for i, n in enumerate(lens)]
  T = sum(lens) + 2  # two padding slots at the end
  tokens = np.zeros((1, T), np.int32)
  segments = np.zeros((1, T), np.int32)
  positions = np.zeros((1, T), np.int32)
  start = 0
  for i, (s, n) in enumerate(zip(seqs, lens)):
    tokens[0, start:start + n] = s
    segments[0, start:start + n] = i + 1
    positions[0, start:start + n] = np.arange(n)
    start += n
  packed = np.asarray(model.forward(CFG, params, tokens, positions_BT=positions,
                                    segment_ids_BT=segments))[0]
  start = 0
  for s, n in zip(seqs, lens):
    alone = np.asarray(forward(CFG, params, s[None]))[0]
    np.testing.assert_allclose(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
    start += n


def test_remat_policies_same_values_and_grads(params):
  tokens = _tokens((2, 8), seed=3)
  weights = jax.random.normal(jax.random.key(4), (2, 8, CFG.vocab_size))

  def loss(p, cfg):
    return jnp.sum(jax.nn.log_softmax(model.forward(cfg, p, tokens)) * weights)

  results = {}
  for remat in ("none", "full", "dots"):
    cfg = CFG.replace(remat=remat)
    results[remat] = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  value0, grads0 = results["none"]
  for remat in ("full", "dots"):
    value, grads = results[remat]
    np.testing.assert_allclose(value, value0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 grads, grads0)
  # The gradient is the real one: a finite difference along a random direction agrees.
  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape), params)
  eps = 1e-3
  shifted = jax.jit(lambda s: loss(jax.tree.map(lambda p, d: p + s * d, params, direction), CFG))
  fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads0),
                                                 jax.tree.leaves(direction)))
  np.testing.assert_allclose(fd, analytic, rtol=2e-2)


def test_hidden_states_then_unembed_equals_forward(params):
  tokens = _tokens((2, 8), seed=6)
  two_step = jax.jit(lambda p, t: model.unembed(CFG, p, model.hidden_states(CFG, p, t)))
  np.testing.assert_allclose(two_step(params, tokens), forward(CFG, params, tokens), atol=1e-6)


def test_bfloat16_runs_and_stays_close(params):
  cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = _tokens((2, 8), seed=7)
  logits = forward(cfg, p16, tokens)
  assert logits.dtype == jnp.float32  # logits always come back in f32
  ref = np.asarray(forward(CFG, params, tokens))
  err = np.abs(np.asarray(logits) - ref)
  assert np.isfinite(logits).all()
  assert err.mean() < 0.05 * np.abs(ref).mean()
  assert (np.argmax(logits, -1) == np.argmax(ref, -1)).mean() > 0.8
  fresh = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(fresh))


def _softmax_attention_reference(q, k, v, mask):
  """numpy: q [B, T, N, H] (already scaled), k/v [B, S, K, H], mask [B, T, S]; query heads
  grouped over KV heads as the model does (head n reads KV head n // (N / K))."""
  B, T, N, H = q.shape
  K = k.shape[2]
  kv_of = np.arange(N) // (N // K)
  scores = np.einsum("btnh,bsnh->bnts", q, k[:, :, kv_of])
  scores = np.where(mask[:, None], scores, -1e30)  # finite: a padding query stays NaN-free
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v[:, :, kv_of])


@pytest.mark.parametrize("T", [150, 200, 512])
def test_causal_attention_in_query_blocks_equals_one_pass(T):
  """The training path computes causal attention in query blocks, each against the keys up to its
  end (2, 3 and 8 blocks, uneven at T = 200). On every real query: the numpy softmax over the full
  causal, packed mask; gradients equal those of one T x T pass."""
  B, N, K, H = 2, 4, 2, 8
  rng = np.random.default_rng(T)
  q, k, v, w = (rng.normal(size=s).astype(np.float32)
                for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)])
  seg = np.ones((B, T), np.int32)
  seg[0, :7] = 0           # left padding
  seg[1, T // 3:] = 2      # two packed documents
  mask = np.asarray(model.attention_mask(jnp.asarray(seg)))

  def per_head(attention):  # [B, T, N, H] in and out, as the reference takes them
    def fn(q, k, v):
      out = attention(q.reshape(B, T, K, N // K, H), k, v, jnp.asarray(mask), "BSKH", "BSKH")
      return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    return fn

  blocked, one_pass = per_head(kernels.causal_attention), per_head(kernels.attend)

  real = seg != 0
  got = np.asarray(jax.jit(blocked)(q, k, v))
  np.testing.assert_allclose(got[real], _softmax_attention_reference(q, k, v, mask)[real],
                             rtol=1e-5, atol=1e-5)

  def loss(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.where(real[..., None, None], fn(*a) * w, 0)),
                            argnums=(0, 1, 2)))
  for g_blocked, g_ref in zip(loss(blocked)(q, k, v), loss(one_pass)(q, k, v)):
    np.testing.assert_allclose(g_blocked, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_on", [(), ("gate",), ("gate", "up")])
def test_swiglu_hand_written_backward_equals_autodiff(lora_on):
  """The MLP's SwiGLU runs a hand-written backward; its value and its gradients with respect to
  x, both kernels and the LoRA updates (none, one, both) equal autodiff of the plain formula."""
  rng = np.random.default_rng(0)
  B, T, D, F = 2, 5, 6, 7
  x, gate_w, up_w, d_h = (jnp.asarray(rng.normal(size=s), jnp.float32)
                          for s in [(B, T, D), (D, F), (D, F), (B, T, F)])
  lora = None if not lora_on else tuple(
      jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32) if name in lora_on else None
      for name in ("gate", "up"))

  def plain(x, gate_w, up_w, lora):
    gate, up = x @ gate_w, x @ up_w
    if lora is not None:
      gate, up = [y if d is None else y + d for y, d in zip((gate, up), lora)]
    return jax.nn.silu(gate) * up

  want, want_vjp = jax.vjp(plain, x, gate_w, up_w, lora)
  got, got_vjp = jax.vjp(kernels.swiglu, x, gate_w, up_w, lora)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  got_grads, want_grads = jax.tree.leaves(got_vjp(d_h)), jax.tree.leaves(want_vjp(d_h))
  assert len(got_grads) == len(want_grads) == 3 + len(lora_on)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_tied_unembedding_hand_written_backward_equals_autodiff():
  """The tied unembedding's backward (table gradient as (h^T d)^T) equals autodiff of h @ E^T."""
  rng = np.random.default_rng(1)
  h, table, d_logits = (jnp.asarray(rng.normal(size=s), jnp.float32)
                        for s in [(2, 5, 6), (11, 6), (2, 5, 11)])
  want, want_vjp = jax.vjp(lambda h, e: h @ e.T, h, table)
  got, got_vjp = jax.vjp(kernels.tied_unembed, h, table)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for g, r in zip(got_vjp(d_logits), want_vjp(d_logits)):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, x_shape, k_shape", [
    ("BTD,DNH->BTNH", (2, 3, 4), (4, 5, 6)),     # flattened: one [6, 4] x [4, 30] dot
    ("BTNH,NHD->BTD", (2, 3, 5, 6), (5, 6, 4)),  # flattened over two contracted dims
    ("BTD,DV->BTV", (2, 3, 4), (4, 7)),
    ("BTD,NDH->BTNH", (2, 3, 4), (5, 4, 6)),     # contracted dim not leading: the einsum
])
def test_project_equals_einsum(spec, x_shape, k_shape):
  rng = np.random.default_rng(1)
  x, k = (rng.normal(size=shape).astype(np.float32) for shape in (x_shape, k_shape))
  want = np.einsum(spec.lower(), x, k)
  got, vjp = jax.vjp(lambda a, b: kernels.project(spec, a, b), x, k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  d_y = rng.normal(size=want.shape).astype(np.float32)
  _, ref_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, k)
  for g, r in zip(vjp(d_y), ref_vjp(d_y)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
