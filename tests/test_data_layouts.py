"""opsd_jax.data.load: every layout and file type, checked against the vendored real files'
own fields (tests/data/real) and small synthetic rows (tests/data/layouts)."""
import json
import os
import subprocess
import sys

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsd_jax import config as config_lib
from opsd_jax import experiment
from opsd_jax import data
from opsd_jax.data import files, jsonl
from real_files import data_file

LAYOUT_FIXTURES = os.path.join(os.path.dirname(__file__), "data", "layouts")


def _raw(name):
  with open(data_file(name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _fixture(name):
  return os.path.join(LAYOUT_FIXTURES, name)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


# ------------------------------------------------------------------------------ real files


def test_gsm8k_real():
  records, report = data.load(data_file("gsm8k_train.jsonl"))
  assert (report.layout, report.file_type, report.rows, report.kept) == ("gsm8k", "jsonl", 7473,
                                                                        7473)
  assert records[0] == {  # the file's first row, by hand
      "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                  "many clips in May. How many clips did Natalia sell altogether in April and May?",
      "reference": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                   "altogether in April and May.",
      "answer": "72"}
  raw = _raw("gsm8k_train.jsonl")
  for row, record in zip(raw, records):
    assert record["question"] == row["question"].strip()
    assert "<<" not in record["reference"] and "####" not in record["reference"]
    assert int(record["answer"]) == int(row["answer"].split("\n#### ")[-1].replace(",", ""))
  assert any("," in r["answer"].split("####")[-1] for r in raw)  # "1,000" forms are present


def test_math500_real_answer_field():
  records, report = data.load(data_file("math500_test.jsonl"))
  raw = _raw("math500_test.jsonl")
  assert report.layout == "math500" and len(records) == len(raw) == 500
  assert [r["answer"] for r in records] == [row["answer"].strip() for row in raw]
  assert [r["reference"] for r in records] == [row["solution"].strip() for row in raw]
  assert [r["question"] for r in records] == [row["problem"].strip() for row in raw]


def test_hendrycks_boxed_extraction_matches_math500_answers(tmp_path):
  raw = _raw("math500_test.jsonl")
  path = _write_jsonl(tmp_path / "hendrycks.jsonl",
                      [{k: v for k, v in row.items() if k != "answer"} for row in raw])
  records, report = data.load(path)
  assert report.layout == "math" and report.kept == 500
  mismatches = [(row["unique_id"], row["answer"], rec["answer"])
                for row, rec in zip(raw, records) if rec["answer"] != row["answer"]]
  assert mismatches == []  # MATH500's answer field is its solution's last box, all 500 rows


def test_aime24_real_problem_wins_and_integers():
  raw = _raw("aime24_test.jsonl")
  assert all("problem" in r and "question" in r for r in raw)
  records, report = data.load(data_file("aime24_test.jsonl"))
  assert report.layout == "aime" and len(records) == 30
  assert [r["answer"] for r in records] == [str(int(row["answer"])) for row in raw]
  assert "025" in [row["answer"] for row in raw] and "25" in [r["answer"] for r in records]
  assert [r["question"] for r in records] == [row["problem"].strip() for row in raw]
  assert all(r["reference"] for r in records)


def test_aime_problem_wins_over_question(tmp_path):
  row = dict(_raw("aime24_test.jsonl")[0], question="a different text", answer="007")
  records, _ = data.load(_write_jsonl(tmp_path / "a.jsonl", [row]))
  assert records[0]["question"] == row["problem"].strip() and records[0]["answer"] == "7"


# ------------------------------------------------------------------------- synthetic layouts


def test_dapo_chat_prompt_and_reward_model():
  records, report = data.load(_fixture("dapo.jsonl"))
  assert report.layout == "dapo"
  assert records == [
      {"question": "Find $x$ if $2x = 6$.", "reference": None, "answer": "3"},
      {"question": "How many primes are below 20?", "reference": None, "answer": "8"},
      {"question": "Compute $\\frac{1}{2} + \\frac{1}{3}$ as $\\frac{m}{n}$ in lowest terms; "
                   "give $m+n$.", "reference": None, "answer": "11"}]


def test_require_reference_drops_and_counts(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load(_fixture("dapo.jsonl"), require_reference=True)
  assert str(e.value) == (f"{_fixture('dapo.jsonl')}: no usable rows (3 read; "
                          "no reference solution: 3)")
  raw = _raw("math500_test.jsonl")[:4]
  rows = [{k: v for k, v in r.items() if k != "solution" or i % 2} for i, r in enumerate(raw)]
  path = _write_jsonl(tmp_path / "test_rows.jsonl", rows)
  kept, _ = data.load(path)
  assert [r["reference"] is None for r in kept] == [True, False, True, False]
  strict, report = data.load(path, require_reference=True)
  assert [r["answer"] for r in strict] == [raw[1]["answer"], raw[3]["answer"]]
  assert (report.kept, report.skipped, report.reasons) == (2, 2, {"no reference solution": 2})
  assert report.examples[0] == f"{path}:1: no reference solution"


def test_openthoughts_conversations_and_messages():
  records, report = data.load(_fixture("openthoughts.jsonl"))
  assert report.layout == "openthoughts"
  assert [r["question"] for r in records] == ["What is $1+1$?", "Simplify $\\frac{2}{4}$."]
  assert [r["answer"] for r in records] == ["2", "\\frac{1}{2}"]  # last box, braces matched
  assert records[0]["reference"].startswith("<|begin_of_thought|>\nA draft: \\boxed{3}?")
  (record,), report = data.load(_fixture("openr1_messages.jsonl"))
  assert report.layout == "openthoughts"
  assert record == {"question": "Solve $x^2 = 9$ for $x > 0$.",
                    "reference": "<think>\nx = 3 or -3.\n</think>\nSince $x>0$, $x = \\boxed{3}$.",
                    "answer": "3"}


def test_amc_float_answers():
  records, report = data.load(_fixture("amc.jsonl"))
  assert report.layout == "aime"
  assert [r["answer"] for r in records] == ["27", "0.5", "3", "7"]
  assert all(r["reference"] is None for r in records)


def test_field_mapping_nested_and_list_answers(tmp_path):
  rows = [{"meta": {"q": "Roots of $x^2=1$?"}, "sol": "x = 1 or x = -1",
           "reward_model": {"ground_truth": ["1", "-1", "1"]}},
          {"meta": {"q": "Half of 1?"}, "reward_model": {"ground_truth": ["0.5"]}},
          {"meta": {"q": "Two?"}, "sol": "", "reward_model": {"ground_truth": 2.0}}]
  path = _write_jsonl(tmp_path / "custom.jsonl", rows)
  fields = {"problem": "meta.q", "solution": "sol", "answer": "reward_model.ground_truth"}
  records, report = data.load(path, fields=fields)
  assert report.layout == "fields"
  assert records == [
      {"question": "Roots of $x^2=1$?", "reference": "x = 1 or x = -1", "answer": ["1", "-1"]},
      {"question": "Half of 1?", "reference": None, "answer": "0.5"},
      {"question": "Two?", "reference": None, "answer": "2"}]
  chat = _write_jsonl(tmp_path / "chat.jsonl",
                      [{"turns": [{"text": "What is 2+2?"}], "gold": 4}])
  (record,), _ = data.load(chat, fields={"problem": "turns.0.text", "solution": "",
                                         "answer": "gold"})
  assert record == {"question": "What is 2+2?", "reference": None, "answer": "4"}
  with pytest.raises(data.DataError, match=r"custom.jsonl:1: missing field 'meta.nope'"):
    data.load(path, fields={"problem": "meta.nope", "answer": "sol"})
  with pytest.raises(data.DataError, match=r"fields: \['answer'\] must name"):
    data.load(path, fields={"problem": "meta.q", "solution": "sol", "answer": ""})
  with pytest.raises(data.DataError, match="not both"):
    data.load(path, fields=fields, fmt="gsm8k")


# ------------------------------------------------------------------------------ file types


@pytest.fixture(scope="module")
def math500_slice(tmp_path_factory):
  root = tmp_path_factory.mktemp("types")
  rows = _raw("math500_test.jsonl")[:25]
  jsonl_path = _write_jsonl(root / "slice.jsonl", rows)
  records, _ = data.load(jsonl_path)
  return root, rows, records


def test_json_and_parquet_give_identical_records(math500_slice):
  root, rows, records = math500_slice
  (root / "list.json").write_text(json.dumps(rows))
  (root / "data.json").write_text(json.dumps({"version": 1, "data": rows}))
  (root / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSONL as .json
  pq.write_table(pa.Table.from_pylist(rows), str(root / "slice.parquet"))
  for name, file_type in [("list.json", "json"), ("data.json", "json"), ("lines.json", "jsonl"),
                          ("slice.parquet", "parquet")]:
    got, report = data.load(str(root / name))
    assert got == records, name
    assert (report.file_type, report.layout, report.kept) == (file_type, "math500", 25)


def test_parquet_nested_dapo_columns(tmp_path):
  rows = _raw_fixture("dapo.jsonl")
  for row in rows:  # a parquet column has one type; DAPO's parquet stores strings
    row["reward_model"]["ground_truth"] = str(row["reward_model"]["ground_truth"])
  path = str(tmp_path / "dapo.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  assert data.load(path)[0] == data.load(_fixture("dapo.jsonl"))[0]


def _raw_fixture(name):
  with open(_fixture(name)) as f:
    return [json.loads(line) for line in f]


def test_save_to_disk_folder_both_readers(math500_slice, tmp_path):
  datasets = pytest.importorskip("datasets")
  _, rows, records = math500_slice
  folder = str(tmp_path / "math500_disk")
  datasets.Dataset.from_list(rows).save_to_disk(folder)
  got, report = data.load(folder)
  assert got == records and report.file_type == "disk"
  # the fallback without datasets reads the same arrow files
  plain = files.disk_rows_pyarrow(folder)
  assert [row for _, row in plain.rows] == datasets.load_from_disk(folder).to_list()
  datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(
      str(tmp_path / "dict"))
  with pytest.raises(data.DataError, match="a DatasetDict folder; point at one split"):
    data.load(str(tmp_path / "dict"))


def test_unsupported_files(tmp_path):
  (tmp_path / "rows.csv").write_text("question,answer\n1,2\n")
  with pytest.raises(data.DataError) as e:
    data.load(str(tmp_path / "rows.csv"))
  assert str(e.value) == (f"{tmp_path}/rows.csv: not a data file this loader reads (.jsonl, "
                          ".json, .parquet or a datasets.save_to_disk folder)")
  with pytest.raises(data.DataError, match="cannot read data file .*missing.jsonl"):
    data.load(str(tmp_path / "missing.jsonl"))
  (tmp_path / "fake.parquet").write_text("not parquet")
  with pytest.raises(data.DataError, match="fake.parquet: not a readable parquet file"):
    data.load(str(tmp_path / "fake.parquet"))
  (tmp_path / "obj.json").write_text('{"rows": []}')
  with pytest.raises(data.DataError, match=r"obj.json: expected a JSON list .*keys: \['rows'\]"):
    data.load(str(tmp_path / "obj.json"))
  os.makedirs(tmp_path / "folder")
  with pytest.raises(data.DataError, match="not a datasets.save_to_disk folder"):
    data.load(str(tmp_path / "folder"))


# -------------------------------------------------------------------------------- bad input


def test_unknown_layout_one_line_before_reading_rows(tmp_path):
  path = tmp_path / "text.jsonl"
  path.write_text('{"text": "hi", "label": 1}\n{broken\n')
  with pytest.raises(data.DataError) as e:
    data.load(str(path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{path}:1: unknown data layout (keys: label, text); give fields=")


def test_bad_row_names_line_or_row_and_skip_counts(tmp_path):
  good = _raw("gsm8k_test.jsonl")[:3]
  lines = [json.dumps(good[0]), "{broken", json.dumps({"question": "q", "answer": "7"}), "",
           json.dumps(good[1]), json.dumps({"question": "q", "answer": "no marker"}),
           json.dumps({"question": "\ud800 bad", "answer": "x\n#### 1"}), json.dumps(good[2])]
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass") + b"\xff\n")
  with pytest.raises(data.DataError) as e:
    data.load(str(path))
  assert str(e.value) == f"{path}:2: malformed JSON (Expecting property name enclosed in " \
                         "double quotes at column 2)"
  records, report = data.load(str(path), on_bad_row="skip")
  assert [r["answer"] for r in records] == [str(int(g["answer"].split("#### ")[-1]))
                                            for g in good]
  assert (report.rows, report.kept, report.skipped) == (8, 3, 5)
  assert report.reasons == {"malformed JSON": 1, "field 'answer' has no '#### <final answer>'": 2,
                            "field 'question' is not valid Unicode": 1, "not valid UTF-8": 1}
  assert report.examples[1] == f"{path}:3: field 'answer' has no '#### <final answer>' " \
                               "(GSM8K form)"
  assert report.examples[4].startswith(f"{path}:9: not valid UTF-8")
  rows = [{"problem": "p", "answer": "1"}, {"problem": "p", "answer": None}]
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "bad.parquet"))
  with pytest.raises(data.DataError, match=r"bad.parquet:row 1: field 'answer' is empty"):
    data.load(str(tmp_path / "bad.parquet"))
  with pytest.raises(data.DataError, match="on_bad_row must be"):
    data.load(str(path), on_bad_row="drop")
  with pytest.raises(data.DataError, match="data format must be one of"):
    data.load(str(path), fmt="csv")


def test_forced_layout_and_legacy_reader_share_data_error(tmp_path):
  path = data_file("math500_test.jsonl")
  records, report = data.load(path, fmt="math")  # answer field wins over the box when present
  assert report.layout == "math" and records == data.load(path)[0]
  assert jsonl.DataError is data.DataError
  legacy, _ = jsonl.read(path, "math500")
  assert legacy == records


# ---------------------------------------------------------------------------- inspect, config


def _inspect(*args):
  return subprocess.run([sys.executable, "-m", "opsd_jax.data.inspect", *args],
                        capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


def test_inspect_prints_layout_counts_and_three_rows(tmp_path):
  run = _inspect(_fixture("dapo.jsonl"))
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert lines[:4] == [f"file: {_fixture('dapo.jsonl')} (jsonl)", "layout: dapo",
                       "rows: 3 read, 3 kept, 0 skipped", "with a reference solution: 0 of 3"]
  expected = data.load(_fixture("dapo.jsonl"))[0]
  assert [json.loads(line.split(": ", 1)[1]) for line in lines[4:]] == expected
  rows = [{"q": {"text": f"Q{i}"}, "gold": i} for i in range(5)] + [{"q": {}}]
  path = _write_jsonl(tmp_path / "custom.jsonl", rows)
  run = _inspect(path, "--fields", "problem=q.text,answer=gold", "--skip")
  assert run.returncode == 0, run.stderr
  assert "rows: 6 read, 5 kept, 1 skipped" in run.stdout
  assert f"  e.g. {path}:6: missing field 'q.text'" in run.stdout
  assert run.stdout.count("\nrecord ") == 3
  run = _inspect(path)
  assert run.returncode == 1 and run.stderr.startswith(f"error: {path}:1: unknown data layout")


def test_config_data_format_takes_the_layout_names():
  assert experiment.CHOICES["data.format"] == data.FORMATS
  assert set(data.LAYOUTS) >= {"gsm8k", "math", "math500", "aime", "dapo", "openthoughts"}
  cfg = config_lib.default_config()
  cfg.model.update(dict(vocab_size=0, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, mlp_dim=128))
  cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  cfg.data.format = "dapo"
  experiment.validate(cfg)
  bad = ml_collections.ConfigDict(cfg.to_dict())
  bad.data.format = "hendrycks"
  with pytest.raises(config_lib.ConfigError, match="data.format must be one of .*got .hendrycks."):
    experiment.validate(bad)
