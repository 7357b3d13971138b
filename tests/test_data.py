"""JSONL -> tfds (array_record) -> grain, bad rows, and sft_batches checked by brute force."""
import collections
import json

import numpy as np
import pytest

from opsd_jax import data
from opsd_jax.data import jsonl, tfds_builder


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _gsm8k_row(i):
  return json.dumps({"question": f"Tom has {i} apples and buys 2. How many?",
                     "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2}.\n#### {i + 2:,}"})


def _math_row(i):
  return json.dumps({"problem": f"Compute ${i}^2$.", "solution": f"$${i}^2 = {i * i}$$",
                     "answer": f"{i * i}"})


def test_normalize_both_forms():
  assert jsonl.normalize(json.loads(_gsm8k_row(1234))) == {
      "question": "Tom has 1234 apples and buys 2. How many?",
      "reference": "He has 1234 + 2 = 1236.", "answer": "1236"}
  assert jsonl.normalize(json.loads(_math_row(3)), "math") == {
      "question": "Compute $3^2$.", "reference": "$$3^2 = 9$$", "answer": "9"}
  assert jsonl.normalize({"problem": "p", "solution": "s", "answer": 7})["answer"] == "7"


BAD_ROWS = [
    ("{not json", "malformed JSON"),
    ('["a list"]', "not an object"),
    ('{"question": "q"}', "missing field 'answer'"),
    ('{"question": "q", "answer": "no final marker"}', "has no '#### <final answer>'"),
    ('{"problem": "p", "solution": "s"}', "no \\boxed{} answer"),
    ('{"problem": "p", "solution": 3, "answer": "1"}', "field 'solution' is not a string"),
    ('{"problem": "p", "solution": "s", "answer": "  "}', "field 'answer' is empty"),
    ('{"text": "hello"}', "neither 'question'"),
]


@pytest.mark.parametrize("bad,why", BAD_ROWS)
def test_bad_row_error_names_file_and_line(tmp_path, bad, why):
  path = _write(tmp_path / "d.jsonl", [_gsm8k_row(1), "", _math_row(2), bad, _gsm8k_row(3)])
  with pytest.raises(jsonl.DataError) as e:
    jsonl.read(path)
  assert str(e.value).startswith(f"{path}:4: ") and why in str(e.value)


def test_bad_rows_skipped_and_counted(tmp_path):
  path = _write(tmp_path / "d.jsonl", [_gsm8k_row(1)] + [b for b, _ in BAD_ROWS] + [_math_row(2)])
  records, stats = jsonl.read(path, on_bad_row="skip")
  assert [r["answer"] for r in records] == ["3", "4"]
  assert (stats.rows, stats.kept, stats.skipped) == (len(BAD_ROWS) + 2, 2, len(BAD_ROWS))
  assert stats.first_errors[0].startswith(f"{path}:2: malformed JSON")


def test_missing_and_invalid_files(tmp_path):
  with pytest.raises(jsonl.DataError, match="cannot read data file .*missing.jsonl"):
    jsonl.read(str(tmp_path / "missing.jsonl"))
  (tmp_path / "bin.jsonl").write_bytes(_gsm8k_row(1).encode() + b"\n\xff\xfe\n")
  with pytest.raises(jsonl.DataError, match="bin.jsonl:2: not valid UTF-8"):
    jsonl.read(str(tmp_path / "bin.jsonl"))
  with pytest.raises(jsonl.DataError, match="no usable rows"):
    jsonl.read(_write(tmp_path / "bad.jsonl", ["{}"]), on_bad_row="skip")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  rows = [_gsm8k_row(i) if i % 2 else _math_row(i) for i in range(23)] + ["{oops"]
  train = _write(root / "train.jsonl", rows)
  test = _write(root / "test.jsonl", [_math_row(i) for i in range(100, 105)])
  sources, counts = tfds_builder.build({"train": train, "test": test}, str(root / "data"),
                                       on_bad_row="skip")
  expected = [json.loads(r) for r in rows[:-1]]
  return root, train, test, sources, counts, expected


def test_tfds_build_round_trip(built):
  root, train, test, sources, counts, expected = built
  assert counts["train"]["skipped"] == 1 and counts["train"]["kept"] == 23
  assert counts["train"]["first_errors"][0].startswith(f"{train}:24: malformed JSON")
  assert len(sources["train"]) == 23 and len(sources["test"]) == 5
  got = [data.decode_record(sources["train"][i]) for i in range(23)]
  assert got == [jsonl.normalize(e) for e in expected]  # order kept, fields normalised
  # an unchanged file reuses the build; its counts come back too
  again, counts_again = tfds_builder.build({"train": train, "test": test}, str(root / "data"),
                                           on_bad_row="skip")
  assert counts_again == counts and len(again["train"]) == 23


def test_tfds_build_error_mode_names_line(built, tmp_path):
  _, train, *_ = built
  with pytest.raises(jsonl.DataError, match=f"{train}:24: malformed JSON"):
    tfds_builder.build({"train": train}, str(tmp_path / "data"))
  with pytest.raises(jsonl.DataError, match="not found"):
    tfds_builder.build({"train": str(tmp_path / "nope.jsonl")}, str(tmp_path / "data"))


def test_grain_record_batches_epoch_and_resume(built):
  *_, sources, _, expected = built
  questions = sorted(jsonl.normalize(e)["question"] for e in expected)
  it = data.record_batches(sources["train"], batch_size=4, seed=3, num_epochs=2,
                           drop_remainder=False)
  batches = list(it)
  flat = [r["question"] for b in batches for r in b]
  assert sorted(flat[:23]) == questions and sorted(flat[23:]) == questions
  assert flat[:23] != flat[23:]  # reshuffled per epoch
  # state saved as JSON mid-stream and restored gives the same next batches
  it = data.record_batches(sources["train"], batch_size=4, seed=3)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(8)]
  fresh = data.record_batches(sources["train"], batch_size=4, seed=3)
  fresh.set_state(state)
  assert [next(fresh) for _ in range(8)] == want
  other_seed = data.record_batches(sources["train"], batch_size=4, seed=4)
  assert [r["question"] for r in next(other_seed)] != [r["question"] for r in batches[0]]


def test_per_process_sharding(built):
  *_, sources, _, expected = built
  shards = [list(data.record_batches(sources["train"], batch_size=4, seed=0, num_epochs=1,
                                     drop_remainder=False, shard=(i, 2))) for i in range(2)]
  assert all(len(b) == 2 for s in shards for b in s[:-1])  # global 4 -> 2 per process
  seen = [[r["question"] for b in s for r in b] for s in shards]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(jsonl.normalize(e)["question"] for e in expected)
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.record_batches(sources["train"], batch_size=3, shard=(0, 2))


def _examples(n, seed=0, max_len=9):
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(3, 50, rng.integers(1, 4))), list(rng.integers(3, 50,
                                                                            rng.integers(1, 6))))
          for _ in range(n)][:n]


def _segments(row):
  """Brute force: split a packed/padded row into its sequences by segment id."""
  out = []
  seg = row["segment_ids"]
  for s in sorted(set(seg.tolist()) - {0}):
    where = np.flatnonzero(seg == s)
    assert (np.diff(where) == 1).all(), "a segment must be contiguous"
    out.append((where, row["tokens"][where], row["loss_mask"][where], row["positions"][where]))
  return out


def _check_rows(batch, examples, seq_len, pad_id):
  by_tokens = collections.defaultdict(list)
  for p, c in examples:
    by_tokens[tuple(p + c)].append((p, c))
  found = []
  for b in range(batch["tokens"].shape[0]):
    row = {k: v[b] for k, v in batch.items()}
    assert all(v.shape == (seq_len,) and v.dtype == np.int32 for v in row.values())
    pad = row["segment_ids"] == 0
    assert (row["tokens"][pad] == pad_id).all() and not row["loss_mask"][pad].any()
    ids = [s for s in row["segment_ids"].tolist() if s]
    assert ids == sorted(ids) and set(ids) == set(range(1, max(ids) + 1))
    for _, tokens, mask, positions in _segments(row):
      key = tuple(tokens.tolist())
      assert key in by_tokens, "every sequence is one example, unsplit"
      p, c = by_tokens[key][0]
      assert mask.tolist() == [0] * len(p) + [1] * len(c)  # completion tokens incl. EOS
      assert positions.tolist() == list(range(len(tokens)))
      found.append(key)
  return found


@pytest.mark.parametrize("packing", [False, True])
def test_sft_batches_brute_force(packing):
  examples = _examples(37)
  seq_len, pad_id = 16, 1
  it = data.sft_batches(examples, batch_size=4, seq_len=seq_len, pad_id=pad_id, packing=packing,
                        seed=5, num_epochs=1)
  found, rows = [], 0
  for batch in it:
    assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions"}
    found += _check_rows(batch, examples, seq_len, pad_id)
    rows += batch["tokens"].shape[0]
  counts = collections.Counter(tuple(p + c) for p, c in examples)
  got = collections.Counter(found)
  assert all(got[k] <= counts[k] for k in got)  # nothing duplicated within an epoch
  if packing:
    assert len(found) > rows  # rows hold several sequences
    assert len(found) >= 37 - 4 * 3  # only what sits in the last, partial batch is dropped
  else:
    assert len(found) == rows == 36  # 9 full batches of 4, one sequence per row


def test_packing_puts_several_sequences_per_row():
  examples = [([5], [6, 7])] * 20
  batch = next(data.sft_batches(examples, 2, 12, pad_id=0, packing=True, seed=0))
  assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  assert batch["loss_mask"][0].tolist() == [0, 1, 1] * 4
  assert batch["positions"][0].tolist() == [0, 1, 2] * 4


@pytest.mark.parametrize("packing", [False, True])
def test_sft_batches_state_restore(packing):
  examples = _examples(50, seed=1)
  make = lambda: data.sft_batches(examples, 4, 16, pad_id=0, packing=packing, seed=2)
  it = make()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(10)]  # crosses an epoch boundary
  restored = make()
  restored.set_state(state)
  for a in want:
    b = next(restored)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sft_truncation_and_bad_examples():
  it = data.sft_batches([([1, 2, 3], [4, 5, 6]), ([1] * 8, [2]), ([7], [8])], 1, 4, pad_id=0,
                        shuffle=False)
  assert it.info == {"examples": 2, "truncated": 1, "dropped": 1}
  first = next(it)
  assert first["tokens"][0].tolist() == [1, 2, 3, 4] and first["loss_mask"][0].tolist() == [0, 0,
                                                                                             0, 1]
  with pytest.raises(ValueError, match="empty prompt"):
    data.sft_batches([([], [1])], 1, 4, pad_id=0)
  with pytest.raises(ValueError, match="no sft example fits"):
    data.sft_batches([([1] * 5, [2])], 1, 4, pad_id=0)
