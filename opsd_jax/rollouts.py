"""Rollouts: sample completions for problems, grade them, and lay them out for the learner.

One function serves RLVR (groups of G), OPSD (student rollouts) and evaluation, so the prompt
template, the sampler settings and the grader can never differ between reward and report.

Learner layout (what the train steps take): prompts left-padded to a bucket length P,
completions right-padded to C = max_new_tokens; tokens [N, P + C], mask [N, P + C] (real
tokens), completion_mask [N, C]. Completion token c sits at index P + c.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from opsd_jax import padding
from opsd_jax import parallel
from opsd_jax import prompts as prompts_lib
from opsd_jax import sampling

COMPLETION_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What sampling and grading need, and nothing else: built once per stage (the stage's model
  config, LoRA adapters included, and its parameter shardings computed once)."""
  model_cfg: Any
  mesh: Any
  param_shardings: Any
  tok: Any
  template: Any
  grader: Any
  prompt_buckets: tuple[int, ...]
  continuous_batching: bool = False
  num_slots: int | None = None

  @classmethod
  def build(cls, model_cfg, mesh, tok, template, grader, sampling_cfg) -> "Sampler":
    """From the experiment's `sampling` section; shardings are computed here, once."""
    return cls(model_cfg, mesh, parallel.param_shardings(model_cfg, mesh), tok, template, grader,
               tuple(int(b) for b in sampling_cfg.prompt_buckets),
               bool(sampling_cfg.continuous_batching), int(sampling_cfg.num_slots) or None)

  def with_model(self, model_cfg) -> "Sampler":
    """The same sampler for another model config (a stage with LoRA adapters)."""
    return dataclasses.replace(self, model_cfg=model_cfg,
                               param_shardings=parallel.param_shardings(model_cfg, self.mesh))


@dataclasses.dataclass
class Rollouts:
  problem_ids: np.ndarray      # [N] index into the problems passed in (prompt-major)
  prompt_ids: list[list[int]]  # [N] the student prompt of each row
  tokens: np.ndarray           # [N, C] completion ids, 0 after the row stopped
  lengths: np.ndarray          # [N] completion length in tokens (EOS included)
  finished: np.ndarray         # [N] stopped on EOS
  sample_logprobs: np.ndarray  # [N, C] log-prob under the (truncated) sampling distribution
  texts: list[str]             # [N] decoded completions
  correct: np.ndarray          # [N] bool, from the grader
  extracted: list              # [N] the graded answer string, None where there was none
  timed_out: np.ndarray        # [N] bool, grader hit its wall-clock limit

  @property
  def truncated(self) -> np.ndarray:
    return ~self.finished


def student_prompts(sampler: Sampler, problems, thinking: bool = True) -> list[list[int]]:
  return [prompts_lib.student(sampler.tok, sampler.template, p["question"], thinking=thinking)
          for p in problems]


def sample_and_grade(sampler: Sampler, params, problems, *, num_samples, temperature, top_p,
                     top_k, max_new_tokens, rng, batch_size=None, thinking=True) -> Rollouts:
  """Samples `num_samples` completions per problem (prompt-major) and grades each. Multi-host:
  `problems` is the global list (the same on every process, see parallel.gather_rows), and so is
  the result; the sampler feeds each process's rows from its devices. `thinking`
  is the student's mode: on for RLVR and evaluation (the Qwen3 thinking convention); OPSD passes
  opsd.student_thinking (Paper A distils a thinking-off student)."""
  prompt_ids = student_prompts(sampler, problems, thinking)
  batch_size = len(problems) if batch_size is None else max(1, batch_size // num_samples)
  parts = []
  for i, start in enumerate(range(0, len(problems), batch_size)):
    out = sampling.generate(
        sampler.model_cfg, params, prompt_ids[start:start + batch_size],
        rng=jax.random.fold_in(rng, i), max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, num_samples=num_samples, eos_ids=sampler.tok.eos_ids,
        prompt_buckets=sampler.prompt_buckets, continuous_batching=sampler.continuous_batching,
        num_slots=sampler.num_slots, mesh=sampler.mesh, param_shardings=sampler.param_shardings)
    parts.append(out)
  tokens = _pad_cat([o.tokens for o in parts], max_new_tokens)
  logprobs = _pad_cat([o.logprobs for o in parts], max_new_tokens).astype(np.float32)
  lengths = np.concatenate([o.lengths for o in parts])
  finished = np.concatenate([o.finished for o in parts])
  texts = [sampler.tok.decode(row[:n].tolist()) for row, n in zip(tokens, lengths)]
  problem_ids = np.repeat(np.arange(len(problems)), num_samples)
  golds = [problems[i]["answer"] for i in problem_ids]
  graded_correct, extracted, timed_out = _grade_shared(sampler.grader, texts, golds)
  correct = graded_correct & finished  # a truncated response is incorrect
  return Rollouts(problem_ids, [prompt_ids[i] for i in problem_ids], tokens, lengths, finished,
                  logprobs, texts, correct, extracted, timed_out)


def _grade_shared(grader, texts, golds):
  """(correct, extracted, timed_out) of every row, on every process; each process grades its
  own block of the rows (multi-host: the problems are global, the sampler's output is too)."""
  own = np.array_split(np.arange(len(texts)), jax.process_count())[jax.process_index()]
  graded = grader.grade([texts[i] for i in own], [golds[i] for i in own])
  mine = [[bool(c), e, bool(t)] for c, e, t in zip(graded.correct, graded.extracted,
                                                   graded.timed_out)]
  rows = parallel.gather_rows(mine)
  return (np.asarray([r[0] for r in rows], bool), [r[1] for r in rows],
          np.asarray([r[2] for r in rows], bool))


def _pad_cat(arrays, width):
  out = []
  for a in arrays:
    a = np.asarray(a)
    out.append(np.pad(a, ((0, 0), (0, width - a.shape[1]))))
  return np.concatenate(out)


def completion_width(lengths_N, max_new_tokens: int, multiple: int = COMPLETION_MULTIPLE) -> int:
  """The learner's completion width C: the longest completion rounded up to `multiple` (so only a
  few shapes compile), at most max_new_tokens. Padding every batch to max_new_tokens would make
  the learner pay for tokens nobody generated."""
  longest = max(1, int(np.max(lengths_N)))
  return min(max_new_tokens, -(-longest // multiple) * multiple)


def learner_batch(prompt_ids, tokens_NC, lengths_N, buckets, pad_id=0) -> dict[str, np.ndarray]:
  """[prompt | completion] sequences in the learner layout (see module doc); the completion width
  is tokens_NC's (trim it with `completion_width` first)."""
  ids_NP, mask_NP = padding.pad_prompts(prompt_ids, buckets, pad_id=pad_id)
  C = tokens_NC.shape[1]
  completion_mask = np.arange(C)[None, :] < np.asarray(lengths_N)[:, None]
  return dict(
      tokens=np.concatenate([np.asarray(ids_NP), tokens_NC], axis=1).astype(np.int32),
      mask=np.concatenate([np.asarray(mask_NP).astype(bool), completion_mask], axis=1),
      completion_mask=completion_mask)
