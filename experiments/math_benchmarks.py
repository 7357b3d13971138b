"""The math benchmarks the paper presets evaluate on: MATH500 at the preset's samples per problem,
AIME24 and AIME25 at 16 (30 problems each: avg@16 keeps their spread readable). The paths are
placeholders; set them with --config.eval.sets.<name>.path=...."""


def sets(aime_samples: int = 16) -> dict:
  return dict(
      math500=dict(path="/path/to/math500.jsonl", num_problems=-1, samples_per_problem=-1),
      aime24=dict(path="/path/to/aime24.jsonl", num_problems=-1, samples_per_problem=aime_samples),
      aime25=dict(path="/path/to/aime25.jsonl", num_problems=-1, samples_per_problem=aime_samples))
