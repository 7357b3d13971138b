"""What the unit tests of losses, steps, LoRA, memory and checkpoints share: a tiny model config,
optimizers with every knob spelled out, a one-device mesh, and SFT / rollout batches laid out as
the stage loops build them (opsd_jax/losses.py's module doc). One definition each, so a change of
batch layout or optimizer config is made once."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from opsd_jax import model, parallel
from opsd_jax.config import ModelConfig
from opsd_jax.train import optim


def tiny_config(vocab_size: int = 56, **overrides) -> ModelConfig:
  """A 2-layer GQA decoder small enough to compile in seconds; tests pick their own vocabulary
  so their random batches (and tolerances) stay as they were measured."""
  fields = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=8, mlp_dim=48)
  fields.update(overrides)
  return ModelConfig(**fields)


def init_params(cfg: ModelConfig, seed: int = 0):
  return jax.jit(lambda key: model.init(cfg, key))(jax.random.key(seed))


def _optimizer(name, lr, grad_clip):
  return optim.make_optimizer(ml_collections.ConfigDict(dict(
      name=name, learning_rate=lr, warmup_steps=0, schedule="constant", b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.0, grad_clip=grad_clip)), total_steps=10)


def sgd(lr: float = 1.0):
  """Plain SGD: an update is exactly -lr x the gradient (what the gradient checks compare)."""
  return _optimizer("sgd", lr, 0.0)


def adam(lr: float = 1e-2):
  return _optimizer("adamw", lr, 1.0)


def single_device():
  return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def sft_batch(vocab_size: int, seed: int = 0, B: int = 8, T: int = 12, packed: bool = True):
  """An SFT batch; packed: row 0 holds two documents, row 1 ends in padding and row 3 trains one
  token (rows with very different numbers of trained tokens)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  positions = np.tile(np.arange(T), (B, 1)).astype(np.int32)
  loss_mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.int32)
  if packed:
    segment_ids[0, 7:] = 2  # two packed documents in row 0
    positions[0, 7:] = np.arange(T - 7)
    segment_ids[1, 9:] = 0  # padding
    loss_mask[0, 7] = 0  # a document's first token is not predicted from the previous document
    loss_mask[segment_ids == 0] = 0
    loss_mask[3] = 0
    loss_mask[3, 5] = 1
  return dict(tokens=tokens, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)


def rollout_batch(vocab_size: int, seed: int = 0, N: int = 8, P: int = 5, Pt: int | None = 7,
                  C: int = 6):
  """A GRPO + OPSD rollout batch: left padding in every third row, row 1's completion ends after
  4 tokens, advantages, and correct = every row but every third. Pt None: the teacher's context
  is the student's (same prompt), else a teacher prompt of Pt tokens before the same completion."""
  rng = np.random.default_rng(seed)
  completion = rng.integers(0, vocab_size, (N, C))
  tokens = np.concatenate([rng.integers(0, vocab_size, (N, P)), completion], 1)
  mask = np.ones_like(tokens)
  mask[::3, :2] = 0
  completion_mask = np.ones((N, C), np.float32)
  completion_mask[1, 4:] = 0
  mask[1, P + 4:] = 0
  if Pt is None:
    teacher_tokens, teacher_mask = tokens, mask
  else:
    teacher_tokens = np.concatenate([rng.integers(0, vocab_size, (N, Pt)), completion], 1)
    teacher_mask = np.ones_like(teacher_tokens)
    teacher_mask[1, Pt + 4:] = 0
  return dict(tokens=tokens.astype(np.int32), mask=mask.astype(np.int32),
              completion_mask=completion_mask, advantages=rng.normal(size=N).astype(np.float32),
              teacher_tokens=teacher_tokens.astype(np.int32),
              teacher_mask=teacher_mask.astype(np.int32), correct=np.arange(N) % 3 != 0)
