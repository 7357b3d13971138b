"""LoRA: adapters in the forward = merged weights (numpy merge), fresh adapters change nothing,
only adapters train (optimizer state adapter-shaped, base untouched and not donated), OPSD holds
one copy of the base and its frozen teacher is the base model, the merged export loads in
transformers with the same logits, the same step on 1 device and on the (2, 2, 2) mesh, the
sampler decodes with the adapters, config errors name the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import config as config_lib, experiment, hf, lora, losses, model, parallel, sampling
from opsd_jax.config import LORA_TARGETS, default_config
from opsd_jax.train import state as state_lib, steps

import helpers
from helpers import adam, sgd, single_device

BASE = helpers.tiny_config(56)
LORA = BASE.replace(lora_rank=4, lora_alpha=8.0)
# Where each target's kernel sits: in dims of the kernel come first, then out dims.
KERNEL_PATH = {"q_proj": ("attn", "q_proj"), "k_proj": ("attn", "k_proj"),
               "v_proj": ("attn", "v_proj"), "o_proj": ("attn", "o_proj"),
               "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}


# Jitted once per config: the eager forward dispatches (and compiles) op by op.
forward = jax.jit(model.forward, static_argnums=0)


@pytest.fixture(scope="module")
def base():
  return helpers.init_params(BASE)


def trained_adapters(cfg, seed=1):
  """Adapters as after some training: A as initialised, B random (nonzero)."""
  adapters = lora.init_adapters(cfg, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 100), 64))

  def visit(tree):
    return {k: (visit(v) if isinstance(v, dict) else
                (0.3 * jax.random.normal(next(keys), v.shape) if k == "lora_b" else v))
            for k, v in tree.items()}
  return visit(adapters)


def numpy_merge(cfg, base, adapters):
  """W + (alpha / r) A B per layer, in numpy, for every target of cfg."""
  merged = jax.tree.map(np.array, base)
  s = cfg.lora_alpha / cfg.lora_rank
  for target in cfg.lora_targets:
    group, name = KERNEL_PATH[target]
    a = np.asarray(adapters["layers"][group][name]["lora_a"], np.float64)
    b = np.asarray(adapters["layers"][group][name]["lora_b"], np.float64)
    w = merged["layers"][group][name]["kernel"]
    for layer in range(cfg.n_layers):
      w[layer] += (s * np.tensordot(a[layer], b[layer], axes=1)).astype(w.dtype)
  return merged


def tokens(seed=0, B=3, T=10):
  return np.random.default_rng(seed).integers(0, BASE.vocab_size, (B, T)).astype(np.int32)


def test_fresh_adapters_leave_the_model_unchanged(base):
  adapters = lora.init_adapters(LORA, jax.random.key(3))
  assert all(not np.any(np.asarray(leaf)) for path, leaf in
             jax.tree_util.tree_flatten_with_path(adapters)[0] if "lora_b" in str(path[-1]))
  x = tokens()
  want = forward(BASE, base, x)
  got = forward(LORA, lora.combine(base, adapters), x)
  # x A B is exactly 0; XLA fuses the extra (zero) add differently: at most float32 rounding.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # The base tree alone, under the LoRA config, runs with the adapters off: the same program.
  np.testing.assert_array_equal(forward(LORA, base, x), want)


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("v_proj", "o_proj", "down")])
def test_forward_with_adapters_equals_forward_of_numpy_merged_weights(base, targets):
  cfg = LORA.replace(lora_targets=targets)
  adapters = trained_adapters(cfg)
  assert set(adapters["layers"]["attn"]) | set(adapters["layers"].get("mlp", {})) == set(targets)
  x = tokens(1)
  want = forward(BASE, numpy_merge(cfg, base, adapters), x)
  got = forward(cfg, lora.combine(base, adapters), x)
  assert np.abs(np.asarray(want) - np.asarray(forward(BASE, base, x))).max() > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  merged = lora.merge(cfg, base, adapters)  # what stages hand on and hf.save writes
  for got_w, want_w in zip(jax.tree.leaves(merged),
                           jax.tree.leaves(numpy_merge(cfg, base, adapters))):
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-6)


def test_sampler_decodes_with_the_adapters(base):
  adapters = trained_adapters(LORA, seed=4)
  prompts = [[1, 5, 9, 2], [3, 4]]
  kw = dict(rng=jax.random.key(0), max_new_tokens=5, temperature=0.0, prompt_buckets=(8,))
  with_adapters = sampling.generate(LORA, lora.combine(base, adapters), prompts, **kw)
  merged = sampling.generate(BASE, numpy_merge(LORA, base, adapters), prompts, **kw)
  plain = sampling.generate(BASE, base, prompts, **kw)
  np.testing.assert_array_equal(with_adapters.tokens, merged.tokens)
  np.testing.assert_allclose(with_adapters.logprobs, merged.logprobs, atol=1e-4)
  assert not np.array_equal(with_adapters.tokens, plain.tokens)


def sft_batch(seed=0, B=8, T=12):
  return helpers.sft_batch(BASE.vocab_size, seed, B, T, packed=False)


def adapter_shapes(adapters):
  return sorted(tuple(x.shape) for x in jax.tree.leaves(adapters))


def test_sft_step_trains_only_the_adapters_with_the_merged_weight_gradient(base):
  """SGD lr 1: the adapter update is minus the gradient of the loss of the MERGED model with
  respect to A and B (autodiff through W + s A B, an independent route to it)."""
  mesh = single_device()
  adapters = trained_adapters(LORA, seed=2)
  batch = sft_batch()
  s = LORA.lora_alpha / LORA.lora_rank

  def merged_loss(ad):
    merged = jax.tree.map(lambda x: x, base)
    for target in LORA.lora_targets:
      group, name = KERNEL_PATH[target]
      a, b = ad["layers"][group][name]["lora_a"], ad["layers"][group][name]["lora_b"]
      w = merged["layers"][group][name]["kernel"]
      delta = jnp.stack([jnp.tensordot(a[i], b[i], axes=1) for i in range(LORA.n_layers)])
      merged["layers"][group][name] = {"kernel": w + s * delta}
    logits = forward(BASE, merged, batch["tokens"])
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    return jnp.sum(nll * mask) / jnp.sum(mask)

  want_loss, want_grad = jax.jit(jax.value_and_grad(merged_loss))(adapters)
  base_before = jax.tree.map(np.array, base)
  adapters_before = jax.tree.map(np.array, adapters)
  tx = sgd(1.0)
  state = state_lib.create(adapters, tx, jax.random.key(0), model_cfg=LORA, mesh=mesh,
                           base_params=base)
  opt_shapes = [tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
  assert all(shape in adapter_shapes(adapters) for shape in opt_shapes)
  step = steps.make_sft_step(LORA, default_config().sft, tx, mesh, chunk=4)
  new, metrics = step(state, parallel.shard_batch(batch, mesh))
  assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5)
  assert adapter_shapes(new.params) == adapter_shapes(adapters)
  update = jax.tree.map(lambda b, a: b - np.asarray(a), adapters_before, new.params)
  for got, want in zip(jax.tree.leaves(update), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  # The base: the very same buffers, alive (not donated), unchanged.
  for old, kept, want in zip(jax.tree.leaves(state.base_params), jax.tree.leaves(new.base_params),
                             jax.tree.leaves(base_before)):
    assert kept is old and not kept.is_deleted()
    np.testing.assert_array_equal(kept, want)

  # Adam: its moments exist for the adapters only.
  state = state_lib.create(adapters, adam(), jax.random.key(0), model_cfg=LORA, mesh=mesh,
                           base_params=base)
  mu_nu = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
  assert sorted(tuple(x.shape) for x in mu_nu) == sorted(adapter_shapes(adapters) * 2)


def rollout_batch(seed=0, N=8, P=5, C=6):
  return helpers.rollout_batch(BASE.vocab_size, seed, N, P, None, C)


def nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def opsd_cfg():
  c = default_config().opsd
  c.rollout_filter, c.divergence, c.teacher = "all", "fkl", "frozen"
  return c


def test_opsd_lora_holds_one_base_and_its_frozen_teacher_is_the_base_model(base):
  mesh = single_device()
  adapters = trained_adapters(LORA, seed=5)
  tx = adam()
  state = state_lib.create(adapters, tx, jax.random.key(0), model_cfg=LORA, mesh=mesh,
                           base_params=base)
  assert state.teacher_params is None
  # One copy of the base: the embedding's shape appears once; the rest is adapter-sized.
  embed_shape = base["embed"]["embedding"].shape
  assert sum(x.shape == embed_shape for x in jax.tree.leaves(state)) == 1
  assert nbytes(state) <= nbytes(base) + 3 * nbytes(adapters) + 1024
  batch = rollout_batch()  # teacher context = student context: the divergence is student vs base
  step = steps.make_opsd_step(LORA, opsd_cfg(), tx, mesh, chunk=4)
  new, metrics = step(state, parallel.shard_batch(batch, mesh))

  student = forward(LORA, lora.combine(base, adapters), batch["tokens"], batch["mask"])
  teacher = forward(BASE, base, batch["tokens"], batch["mask"])  # the base model, no LoRA
  P = batch["tokens"].shape[1] - batch["completion_mask"].shape[1]
  per_token = losses.token_divergence(student[:, P - 1:-1], teacher[:, P - 1:-1], kind="fkl")
  want = np.sum(per_token * batch["completion_mask"]) / batch["completion_mask"].sum()
  assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-4)
  assert float(metrics["loss"]) > 1e-3
  assert all(a is b for a, b in zip(jax.tree.leaves(new.base_params),
                                    jax.tree.leaves(state.base_params)))
  assert nbytes(new) == nbytes(state)
  # With fresh adapters student = teacher: METHOD.md's identity, loss and gradient 0.
  fresh = state_lib.create(lora.init_adapters(LORA, jax.random.key(6)), tx, jax.random.key(0),
                           model_cfg=LORA, mesh=mesh, base_params=base)
  _, m = step(fresh, parallel.shard_batch(batch, mesh))
  assert abs(float(m["loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-5
  snapshot = state_lib.create(adapters, tx, jax.random.key(0), adapters, model_cfg=LORA,
                              mesh=mesh, base_params=base)
  with pytest.raises(ValueError, match="base alone"):
    step(snapshot, parallel.shard_batch(batch, mesh))


def test_same_lora_steps_on_one_device_and_on_the_mesh(base):
  """OPSD (EMA teacher of the adapters) and GRPO (reference = the base alone) with LoRA."""
  adapters = trained_adapters(LORA, seed=7)
  c = default_config()
  c.rlvr.kl_beta = 0.05
  o = opsd_cfg()
  o.teacher = "ema"
  batch = rollout_batch(1)
  results = []
  for mesh in (single_device(), parallel.make_mesh(2, 2, 2)):
    base_m = jax.device_put(base, parallel.param_shardings(BASE, mesh))
    tx = sgd(0.5)
    score = steps.make_score_fn(LORA, mesh, temperature=0.7, chunk=4)
    b = dict(batch)
    device_batch = parallel.shard_batch(b, mesh)
    b["old_logprobs"] = np.asarray(score(lora.combine(base_m, adapters), device_batch))
    b["ref_logprobs"] = np.asarray(score(base_m, device_batch))
    state = state_lib.create(adapters, tx, jax.random.key(0), model_cfg=LORA, mesh=mesh,
                             base_params=base_m)
    state, m_grpo = steps.make_grpo_step(LORA, c.rlvr, tx, mesh, temperature=0.7, chunk=4)(
        state, parallel.shard_batch(b, mesh))
    state = state_lib.create(state.params, tx, jax.random.key(0), state.params, model_cfg=LORA,
                             mesh=mesh, base_params=base_m)
    state, m_opsd = steps.make_opsd_step(LORA, o, tx, mesh, chunk=4)(
        state, parallel.shard_batch(b, mesh))
    results.append((b, jax.tree.map(np.asarray, state.params),
                    jax.tree.map(np.asarray, state.teacher_params), m_grpo, m_opsd))
  (b1, p1, t1, g1, o1), (b8, p8, t8, g8, o8) = results
  # The reference scores are the base model's own (LoRA off), computed independently here.
  logits = forward(BASE, base, batch["tokens"], batch["mask"]) / 0.7
  P = batch["tokens"].shape[1] - batch["completion_mask"].shape[1]
  want_ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, P - 1:-1], -1)),
                                batch["tokens"][:, P:, None], -1)[..., 0]
  np.testing.assert_allclose(b1["ref_logprobs"], want_ref, atol=1e-5)
  np.testing.assert_allclose(b8["ref_logprobs"], want_ref, atol=1e-5)
  for m1, m8 in ((g1, g8), (o1, o8)):
    assert float(m1["loss"]) == pytest.approx(float(m8["loss"]), rel=1e-4, abs=1e-6)
  for x1, x8 in zip(jax.tree.leaves((p1, t1)), jax.tree.leaves((p8, t8))):
    np.testing.assert_allclose(x1, x8, rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(p1),
                                                   jax.tree.leaves(adapters)))


def test_merged_export_loads_in_transformers_with_the_same_logits(base, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  adapters = trained_adapters(LORA, seed=9)
  params = lora.combine(base, adapters)
  hf.save(str(tmp_path), LORA, params)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager")
  hf_model.eval()
  x = tokens(2, B=2, T=12)
  with torch.no_grad():
    want = hf_model(torch.as_tensor(x, dtype=torch.long)).logits.numpy()
  got = np.asarray(forward(LORA, params, x))
  assert np.abs(got - np.asarray(forward(BASE, base, x))).max() > 1e-2
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("key,value,named", [
    ("rank", -1, "lora.rank"), ("alpha", 0.0, "lora.alpha"),
    ("targets", ("q_proj", "lm_head"), "lora.targets"),
    ("targets", ("up", "up"), "lora.targets"), ("targets", (), "lora.targets")])
def test_bad_lora_config_names_the_key(key, value, named):
  c = default_config()
  c.lora.rank = 8
  c.lora[key] = value
  with pytest.raises(config_lib.ConfigError, match=named):
    experiment.validate(c, check_devices=False)


def test_stage_loop_checkpoints_adapters_and_resumes_on_the_same_base(base, tmp_path):
  """StageLoop with lora.rank > 0: the state trains adapters on the given base; a checkpoint holds
  adapters + optimizer state (not the base); a new loop on the same base resumes them exactly,
  a different base is refused; the stage output is the merged model."""
  from opsd_jax import checkpoint, metrics, pipeline, rollouts
  from opsd_jax.train import loop

  c = default_config()
  c.lora.rank, c.lora.alpha = LORA.lora_rank, LORA.lora_alpha
  c.sft.steps = 1
  mesh = single_device()
  base = jax.device_put(base, parallel.param_shardings(BASE, mesh))
  sampler = rollouts.Sampler.build(BASE, mesh, None, None, None, c.sampling)
  run = pipeline.Run(c, str(tmp_path), BASE, mesh, None, None, [], {},
                     metrics.Logger(str(tmp_path), tensorboard=False), None, sampler)
  lp = loop.StageLoop(run, "sft", base, total_steps=1, learning_rate=1e-2)
  assert lp.model_cfg == LORA and lp.sampler.model_cfg == LORA
  assert adapter_shapes(lp.state.params) == adapter_shapes(lora.init_adapters(LORA,
                                                                             jax.random.key(0)))
  step = steps.make_sft_step(lp.model_cfg, c.sft, lp.optimizer, mesh, chunk=4)
  lp.state, _ = step(lp.state, parallel.shard_batch(sft_batch(), mesh))
  saved = jax.tree.map(np.asarray, (lp.state.params, lp.state.opt_state))
  lp.save(1, {"data": 7})
  merged = lp.final_params()
  lp.close()
  want = numpy_merge(LORA, jax.tree.map(np.asarray, base), saved[0])
  for got_w, want_w in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-6)
  stored = checkpoint.restore(lp.ckpt_dir)[0]
  # Not the base: adapters, their two Adam moments and scalars.
  assert stored.get("base_params") is None
  assert nbytes(stored) <= 3 * nbytes(saved[0]) + 1024

  again = loop.StageLoop(run, "sft", base, total_steps=1, learning_rate=1e-2)
  assert again.resume()["data"] == 7 and again.start_step == 1
  for got, want in zip(jax.tree.leaves((again.state.params, again.state.opt_state)),
                       jax.tree.leaves(saved)):
    np.testing.assert_array_equal(got, want)
  assert all(a is b for a, b in zip(jax.tree.leaves(again.state.base_params),
                                    jax.tree.leaves(base)))
  again.close()
  other = jax.tree.map(lambda x: x * 1.5, base)
  with pytest.raises(checkpoint.CheckpointError, match="other base"):
    loop.StageLoop(run, "sft", other, total_steps=1, learning_rate=1e-2).resume()


@pytest.mark.slow
def test_toy_pipeline_with_lora_runs_every_stage(tmp_path):
  """`--config.lora.rank=8` end to end through the CLI (tiny settings): every stage trains its
  adapters and hands on merged, plain parameters."""
  from pipeline_helpers import TINY_MODEL, TOY, assert_ok, final_params, records, run

  proc, _ = run(TOY, tmp_path, *TINY_MODEL, "--config.lora.rank=8", "--config.lora.alpha=16",
                "--config.data.num_train=200", "--config.data.num_test=8",
                "--config.eval.num_problems=8", "--config.eval.max_new_tokens=32",
                "--config.sampling.max_new_tokens=32", "--config.sft.batch_size=8",
                "--config.sft.steps=2", "--config.rlvr.steps=1", "--config.rlvr.prompts_per_step=4",
                "--config.rlvr.group_size=4", "--config.rlvr.overlong_penalty=1.0",
                "--config.rlvr.overlong_buffer=24", "--config.rlvr.kl_beta=0.01",
                "--config.opsd.steps=2", "--config.opsd.prompts_per_step=4",
                "--config.opsd.rollout_filter=all", "--config.optimizer.warmup_steps=0",
                "--config.rlvr.warmup_steps=0", "--config.opsd.warmup_steps=0")
  assert_ok(proc)
  recs = records(tmp_path)
  for stage, n in (("sft", 2), ("rlvr", 1), ("opsd", 2)):
    assert [r["step"] for r in recs if r["stage"] == stage] == list(range(1, n + 1)), stage
  finals = {s: final_params(tmp_path, s) for s in ("sft", "rlvr", "opsd")}
  assert not any("lora" in k for f in finals.values() for k in f)
  assert set(finals["sft"]) == set(finals["opsd"])
  for before, after in (("sft", "rlvr"), ("rlvr", "opsd")):
    assert any(not np.array_equal(finals[before][k], finals[after][k]) for k in finals[before])
  # Adapters only touch their projections: norms and the embedding come through unchanged.
  for key in finals["sft"]:
    if "norm" in key or "embed" in key:
      np.testing.assert_array_equal(finals["sft"][key], finals["opsd"][key])
