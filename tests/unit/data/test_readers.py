"""readers: every source kind yields (Source, dict | DataError) with the right file:line."""

import gzip
import json
import time
from pathlib import Path

import pytest

from lmpipeline.data.readers import mix_datasets, read_rows, select_rows, split_rows
from lmpipeline.data.types import DataError, Source

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"


def rows_of(spec, **kw):
    return list(read_rows(spec, **kw))


def records(pairs):
    assert not [r for _, r in pairs if isinstance(r, DataError)], "unexpected bad rows"
    return [r for _, r in pairs]


# --- real files ------------------------------------------------------------------------------


def test_json_array_gives_row_index_and_element_line(shared_data):
    path = shared_data / "sft_alpaca" / "llamafactory_alpaca_en_demo.json"
    pairs = rows_of(path)
    assert len(pairs) == 999
    first, second = pairs[0][0], pairs[1][0]
    assert first == Source(str(path), 0, 2)  # "[" on line 1, first "{" on line 2
    assert second.row == 1 and second.line > first.line
    lines = path.read_text(encoding="utf-8").split("\n")
    assert all(lines[s.line - 1].strip() == "{" for s, _ in pairs[:50])
    assert set(pairs[0][1]) == {"instruction", "input", "output"}


def test_jsonl_line_numbers(shared_data):
    path = shared_data / "sft_messages" / "llamafactory_v1_sft_demo.jsonl"
    pairs = rows_of(path)
    assert len(pairs) == 500
    assert [s.line for s, _ in pairs[:3]] == [1, 2, 3]
    assert str(pairs[2][0]) == f"{path}:3"
    assert "messages" in pairs[0][1]


def test_txt_one_document_per_line(shared_data):
    path = shared_data / "pretrain_text" / "llamafactory_wiki_demo.txt"
    pairs = rows_of(path)
    assert len(pairs) == 30
    assert pairs[0][1]["text"].startswith("Anarchism is a political philosophy")
    assert rows_of(path, text_field="body")[0][1].keys() == {"body"}


def test_csv_lines_follow_multiline_records():
    pairs = rows_of(FIXTURES / "alpaca.csv")
    recs = records(pairs)
    assert [s.line for s, _ in pairs] == [2, 5, 6]  # record 1 spans lines 2-4
    assert recs[0]["output"] == "Animals: elephant\nPlants: oak tree\nMinerals: copper ore"
    assert recs[1] == {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def test_csv_wrong_field_count_is_a_row_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    pairs = rows_of(path)
    assert isinstance(pairs[1][1], DataError) and pairs[1][0].line == 3
    assert "3 fields" in pairs[1][1].reason


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"]}), path)
    pairs = rows_of(path)
    assert records(pairs) == [{"instruction": "a", "output": "x"}, {"instruction": "b", "output": "y"}]
    assert pairs[1][0] == Source(str(path), 1, None)
    assert str(pairs[1][0]) == f"{path}[row 1]"


def test_folder_of_files_sorted_each_its_own_source(tmp_path, shared_data):
    (tmp_path / "b.jsonl").write_text('{"text": "from b"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("from a\n\nalso a\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text('[{"text": "from c"}]', encoding="utf-8")
    (tmp_path / "README.md").write_text("# not data\n", encoding="utf-8")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    pairs = rows_of(tmp_path)
    assert [r["text"] for r in records(pairs)] == ["from a", "also a", "from b", "from c"]
    assert [Path(s.file).name for s, _ in pairs] == ["a.txt", "a.txt", "b.jsonl", "c.json"]
    assert pairs[1][0].line == 3


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no data files"):
        read_rows(tmp_path)


def test_datasets_on_disk_folder_and_split_choice(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}])
    ds.save_to_disk(str(tmp_path / "single"))
    pairs = rows_of(tmp_path / "single")
    assert records(pairs) == [{"text": "one"}, {"text": "two"}]
    assert pairs[1][0].row == 1

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list([{"text": "t"}])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(rows_of(tmp_path / "dict")) == 2  # train by default
    test_pairs = rows_of(tmp_path / "dict", split="test")
    assert records(test_pairs) == [{"text": "t"}]
    assert test_pairs[0][0].file.endswith(":test")
    with pytest.raises(DataError, match="no split 'validation'.*train"):
        rows_of(tmp_path / "dict", split="validation")


def test_load_dataset_path_on_local_files(tmp_path, shared_data):
    """The Hub path is datasets.load_dataset; exercised offline through the json builder."""
    pairs = rows_of(
        "json",
        split="train",
        hub_kwargs={
            "data_files": str(shared_data / "pretrain_text" / "llamafactory_c4_demo.jsonl"),
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    assert len(pairs) == 300
    assert pairs[0][0] == Source("json:train", 0)
    assert "text" in pairs[0][1]


def test_offline_hub_name_gives_clean_error():
    with pytest.raises(DataError) as err:
        read_rows("nobody-xyz/no-such-dataset")
    assert "nobody-xyz/no-such-dataset" in str(err.value)
    assert "Offline" in str(err.value) or "offline" in str(err.value)


@pytest.mark.parametrize("spec", ["missing.jsonl", "./data/x", "/nonexistent/train.json", "d/train.csv.gz"])
def test_missing_file_is_a_clear_error_at_call_time(spec):
    with pytest.raises(DataError, match="file not found"):
        read_rows(spec)  # no iteration needed: the config layer wraps this call


def test_split_on_plain_file_is_refused(shared_data):
    with pytest.raises(DataError, match="single split"):
        rows_of(shared_data / "pretrain_text" / "llamafactory_c4_demo.jsonl", split="validation")


# --- JSON shapes -----------------------------------------------------------------------------


def test_json_object_wrapping_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    pairs = rows_of(path)
    assert records(pairs) == [{"text": "a"}, {"text": "b"}]
    assert pairs[1][0] == Source(str(path), 1)


def test_minified_json_array_uses_row_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, {"text": "b"}]', encoding="utf-8")
    pairs = rows_of(path)
    assert [str(s) for s, _ in pairs] == [f"{path}[row 0]", f"{path}[row 1]"]


def test_json_single_object_and_empty_array(tmp_path):
    one = tmp_path / "one.json"
    one.write_text('{"text": "only"}', encoding="utf-8")
    assert records(rows_of(one)) == [{"text": "only"}]
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{empty} holds no rows"):  # named, not "no format in 0 rows"
        rows_of(empty)


def test_jsonl_saved_as_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n', encoding="utf-8")
    pairs = rows_of(path)
    assert [s.line for s, _ in pairs] == [1, 2, 3]
    assert isinstance(pairs[2][1], DataError)


def test_truncated_json_array_raises_with_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        rows_of(path)
    assert err.value.source.line is not None and err.value.source.line >= 3
    assert "not valid JSON" in err.value.reason


def test_json_array_element_with_bad_utf8_is_one_row_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"},\n{"text": "fine"}\n]')
    pairs = rows_of(path)
    assert [isinstance(r, DataError) for _, r in pairs] == [False, True, False]
    assert pairs[1][0].line == 3 and "UTF-8" in pairs[1][1].reason


def test_json_array_of_non_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, "b", 3]', encoding="utf-8")
    pairs = rows_of(path)
    assert "found a string" in pairs[1][1].reason and "found a number" in pairs[2][1].reason


# --- robustness --------------------------------------------------------------------------------


def test_bom_crlf_and_gzip(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    pairs = rows_of(path)
    assert records(pairs) == [{"text": "a"}, {"text": "b"}] and pairs[1][0].line == 3
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "z"}\n'))
    assert records(rows_of(gz)) == [{"text": "z"}]


def test_nul_bytes_are_row_errors_not_hangs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a\x00b"}\n\x00\x00\x00\n{"text": "ok"}\n')
    pairs = rows_of(path)
    assert [isinstance(r, DataError) for _, r in pairs] == [True, True, False]
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"fine\nbin\x00ary\n")
    pairs = rows_of(txt)
    assert "NUL" in pairs[1][1].reason and pairs[1][0].line == 2


def test_ten_megabyte_line(tmp_path):
    path = tmp_path / "big.jsonl"
    big = "x" * (10 * 1024 * 1024)
    path.write_text(json.dumps({"text": big}) + "\n" + '{"text": "small"}\n', encoding="utf-8")
    start = time.perf_counter()
    pairs = rows_of(path)
    assert time.perf_counter() - start < 5
    assert len(pairs[0][1]["text"]) == len(big) and pairs[1][0].line == 2


def test_invalid_utf8_line_reported_with_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"good\n\xff\xfebad\nalso good\n")
    pairs = rows_of(path)
    assert pairs[1][0].line == 2 and "invalid UTF-8" in pairs[1][1].reason
    assert pairs[2][1] == {"text": "also good"}


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(path)


# --- selection, splitting, mixing ----------------------------------------------------------------


def test_select_rows():
    rows = list(range(10))
    assert select_rows(rows, max_samples=3) == [0, 1, 2]
    shuffled = select_rows(rows, shuffle=True, seed=1)
    assert sorted(shuffled) == rows and shuffled != rows
    assert shuffled == select_rows(rows, shuffle=True, seed=1)
    assert rows == list(range(10))  # input untouched


def test_split_rows_ratios():
    rows = list(range(100))
    parts = split_rows(rows, ratio=0.1, seed=0)
    assert (len(parts["train"]), len(parts["validation"])) == (90, 10)
    assert sorted(parts["train"] + parts["validation"]) == rows
    assert parts == split_rows(rows, ratio=0.1, seed=0)
    three = split_rows(rows, ratio=(0.8, 0.1, 0.1), seed=0)
    assert [len(three[k]) for k in ("train", "validation", "test")] == [80, 10, 10]
    named = split_rows(rows, ratio={"train": 0.95, "eval": 0.05}, seed=0)
    assert len(named["eval"]) == 5
    assert split_rows(rows) == {"train": rows}
    tiny = split_rows([1, 2], ratio=0.01)
    assert len(tiny["validation"]) == 1 and len(tiny["train"]) == 1


@pytest.mark.parametrize("ratio", [1.5, 0.0, (0.5, 0.6), {"train": 0.5}])
def test_split_rows_bad_ratio(ratio):
    with pytest.raises(DataError):
        split_rows(list(range(10)), ratio=ratio)


def test_split_rows_too_few_rows():
    with pytest.raises(DataError, match="would be empty"):
        split_rows([1], ratio=0.5)


def test_mix_datasets_proportions():
    a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(10)]
    mixed = mix_datasets([(a, 0.5), (b, 0.5)], seed=0)
    assert len(mixed) == 110  # default total = sum of sizes
    assert sum(x.startswith("b") for x in mixed) == 55  # b upsampled
    assert mixed == mix_datasets([(a, 0.5), (b, 0.5)], seed=0)
    assert {x for x in mixed if x.startswith("b")} == set(b)  # every b row used
    small = mix_datasets([(a, 3), (b, 1)], seed=0, total=20)
    assert sum(x.startswith("a") for x in small) == 15 and len(set(small)) == 20


def test_mix_datasets_errors():
    with pytest.raises(DataError):
        mix_datasets([([1], 0)], seed=0)
    with pytest.raises(DataError, match="empty"):
        mix_datasets([([], 1.0)], seed=0)
