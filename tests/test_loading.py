import json

import datasets
import pytest

from data_pipelines import DataError
from data_pipelines.loading import (load_rows, parse_builtin, prompt_problem, require_columns, row_location,
                                    to_messages)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_task_splits_and_options():
    ds = load_rows("builtin:arith?n_train=30&seed=2")
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 30
    assert {"id", "prompt", "answer", "problem"} <= set(ds.column_names)
    test = load_rows("builtin:arith:test?n_test=12", split="train")  # inline split wins
    assert test.num_rows == 12 and not set(test["id"]) & set(load_rows("builtin:arith?n_train=300")["id"])
    assert load_rows("builtin:arith", "validation", task_options={"n_validation": 5, "level": "hard"}).num_rows == 5
    assert parse_builtin("builtin:arith:test?n_test=3&level=medium").options == {"n_test": 3, "level": "medium"}
    with pytest.raises(DataError, match="unknown built-in task"):
        load_rows("builtin:nope")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_rows("builtin:arith", "dev")


def test_jsonl_json_parquet_and_streaming(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    _write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    for name in ("a.jsonl", "b.json", "c.parquet"):
        ds = load_rows(str(tmp_path / name))
        assert ds.to_list() == rows, name
    it = load_rows(str(tmp_path / "a.jsonl"), streaming=True)
    assert isinstance(it, datasets.IterableDataset) and [r["answer"] for r in it] == ["0", "1", "2", "3", "4"]
    # rows with different keys: the union of columns, missing values null
    _write_jsonl(tmp_path / "u.jsonl", [{"a": 1}, {"b": "x"}])
    assert load_rows(str(tmp_path / "u.jsonl")).to_list() == [{"a": 1, "b": None}, {"a": None, "b": "x"}]


def test_directory_of_shards_uses_split_names(tmp_path):
    _write_jsonl(tmp_path / "train-00000.jsonl", [{"x": 1}])
    _write_jsonl(tmp_path / "train-00001.jsonl", [{"x": 2}])
    _write_jsonl(tmp_path / "test.jsonl", [{"x": 3}])
    (tmp_path / "stats.json").write_text("{}")  # not a data file of any split
    assert load_rows(str(tmp_path))["x"] == [1, 2]
    assert load_rows(str(tmp_path), "test")["x"] == [3]
    with pytest.raises(DataError, match="no files for split 'validation'"):
        load_rows(str(tmp_path), "validation")
    flat = tmp_path / "flat"
    flat.mkdir()
    _write_jsonl(flat / "a.jsonl", [{"x": 1}])
    _write_jsonl(flat / "b.jsonl", [{"x": 2}])
    assert load_rows(str(flat))["x"] == [1, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet files"):
        load_rows(str(tmp_path / "empty"))


def test_malformed_line_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": f"q{i}", "answer": "1"}) for i in range(20)]
    lines[16] = '{"prompt": "q16", "answer": '  # line 17
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 17: invalid JSON"):
        load_rows(str(p))
    bad: list = []
    ds = load_rows(str(p), bad_rows=bad)
    assert ds.num_rows == 19 and bad[0]["location"].endswith("bad.jsonl line 17")
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_rows(str(p))


def test_wrong_type_row_named(tmp_path):
    p = _write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"},
                                                {"prompt": 7, "answer": "3"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl line 3: column 'prompt' is a number here but a string"):
        load_rows(str(p))
    bad: list = []
    assert load_rows(str(p), bad_rows=bad)["prompt"] == ["a", "b"] and len(bad) == 1


def test_type_mixed_inside_nested_values_named_by_line_and_column(tmp_path):
    """An int `output` among string ones inside a list of test cases cannot share a table with the other
    rows; the error named only the file ("cannot build a table: Could not convert ...")."""
    rows = [{"prompt": f"Print {i}.", "tests": [{"input": "", "output": f"{i}\n"}]} for i in range(6)]
    rows[3]["tests"] = [{"input": "", "output": 3}]
    p = _write_jsonl(tmp_path / "code.jsonl", rows)
    with pytest.raises(DataError, match=r"code\.jsonl line 4: column 'tests' has a value of another type"):
        load_rows(str(p))
    rows = [{"prompt": "q", "meta": {"a": 1}}] * 3 + [{"prompt": "q", "meta": {"a": "x"}}]
    p = _write_jsonl(tmp_path / "meta.jsonl", rows)
    with pytest.raises(DataError, match=r"meta\.jsonl line 4: column 'meta'"):
        load_rows(str(p))


def test_json_array_item_that_is_not_an_object_named_or_skipped(tmp_path):
    """One non-object item in a .json array failed the whole file ("expected a JSON array of objects"),
    naming no item, even when bad rows were to be skipped."""
    items = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    items.insert(3, ["oops"])
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"arr\.json item 3: expected a JSON object, got list"):
        load_rows(str(p))
    bad: list = []
    ds = load_rows(str(p), bad_rows=bad)
    assert ds["prompt"] == ["q0", "q1", "q2", "q3", "q4"] and [b["location"] for b in bad] == [f"{p} item 3"]
    assert row_location(ds, 3) == f"{p} item 4"  # the others keep their own positions


def test_missing_paths_and_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_rows(str(tmp_path / "x.csv"))
    # No network here: the Hub path is tested for its message (offline mode makes it fail fast).
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"could not load 'someorg/no-such-dataset' \(split 'train'\) from the Hugging Face Hub"):
        load_rows("someorg/no-such-dataset")


def test_column_and_prompt_validation(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}, {"question": "r", "answer": "2"}])
    ds = load_rows(str(p))
    with pytest.raises(DataError, match=r"missing column 'prompt'; columns are: \['question', 'answer'\]"):
        require_columns(ds, ["prompt", "answer"], str(p))
    require_columns(ds, ["question"], str(p))
    assert row_location(ds, 1).endswith("d.jsonl line 2")
    assert row_location(datasets.Dataset.from_dict({"a": [1]}), 0, "src") == "src row 0"
    assert prompt_problem("hi") is None and prompt_problem([{"role": "user", "content": "hi"}]) is None
    assert prompt_problem("  ") == "prompt is empty"
    assert prompt_problem(None) == "prompt is null"
    assert "not a string" in prompt_problem(3)
    assert "no non-empty user message" in prompt_problem([{"role": "system", "content": "s"}])
    assert "unknown role" in prompt_problem([{"role": "bot", "content": "s"}])
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]


def test_bytes_that_are_not_utf8_are_named_by_their_exact_line(tmp_path):
    """Lines are decoded one by one: a bad byte on line 41 of a 41 KB file was reported as line 33
    (text decoded in 8 KB chunks), on line 2 of a small file as line 1; a .json file was a
    UnicodeDecodeError traceback."""
    lines = [json.dumps({"prompt": "q" * 1000 + str(i), "answer": "1"}).encode() for i in range(41)]
    lines[40] = lines[40].replace(b'"answer": "1"', b'"answer": "caf\xe9"')
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"\n".join(lines) + b"\n")
    assert big.stat().st_size > 41_000
    column = lines[40].index(b"\xe9") + 1  # all ASCII before it
    with pytest.raises(DataError, match=rf"big\.jsonl line 41: not valid UTF-8 \(byte 0xe9 at column {column}: "):
        load_rows(str(big))
    bad: list = []
    assert load_rows(str(big), bad_rows=bad).num_rows == 40  # skipped like any other malformed line
    assert [b["location"] for b in bad] == [f"{big} line 41"] and bad[0]["reason"].startswith("not valid UTF-8")

    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"prompt": "\xc3\xa9"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"small\.jsonl line 2: not valid UTF-8 \(byte 0xe9 at column 16"):
        load_rows(str(small))

    array = tmp_path / "latin1.json"  # one JSON document: named by its line too
    array.write_bytes(b'[\n  {"prompt": "\xc3\xa9t\xc3\xa9", "answer": "1"},\n  {"prompt": "caf\xe9", "answer": "2"}\n]\n')
    for rows in (None, []):
        with pytest.raises(DataError, match=r"latin1\.json line 3: not valid UTF-8 \(byte 0xe9 at column 18"):
            load_rows(str(array), bad_rows=rows)
    as_lines = tmp_path / "lines.json"  # JSON lines under a .json name
    as_lines.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"lines\.json line 2: not valid UTF-8"):
        load_rows(str(as_lines))
    bad = []
    assert load_rows(str(as_lines), bad_rows=bad)["prompt"] == ["a"] and bad[0]["location"].endswith("line 2")
    (tmp_path / "ok.json").write_text(json.dumps([{"prompt": "été"}], ensure_ascii=False), encoding="utf-8")
    assert load_rows(str(tmp_path / "ok.json"))["prompt"] == ["été"]


def _chat(content, answer="a"):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def test_nested_type_clash_names_the_odd_row_even_when_it_is_the_first(tmp_path):
    """Line 1 with an int `content` among string ones was reported as "line 2: … another type than in
    the rows before it" (the first row that disagreed with the rows before it, not the odd one); with
    `bad_rows` such a row raised instead of being skipped."""
    rows = [_chat(5, 6)] + [_chat(f"q{i}") for i in range(5)]
    p = _write_jsonl(tmp_path / "first.jsonl", rows)
    with pytest.raises(DataError, match=r"first\.jsonl line 1: column 'messages' has a value of another type "
                                        r"than in most rows: .*content: int64.* here, .*content: string.* in most"):
        load_rows(str(p))
    bad: list = []
    ds = load_rows(str(p), bad_rows=bad)
    assert [b["location"] for b in bad] == [f"{p} line 1"] and ds.num_rows == 5
    assert row_location(ds, 0) == f"{p} line 2"

    rows = [_chat(f"q{i}") for i in range(6)]  # an int and a str `content` inside one row, mid-file
    rows[3] = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}
    p = _write_jsonl(tmp_path / "mid.jsonl", rows)
    with pytest.raises(DataError, match=r"mid\.jsonl line 4: column 'messages' has a value of another type than in "
                                        r"most rows \(.*content: string.*\): Expected bytes, got a 'int' object"):
        load_rows(str(p))
    bad = []
    ds = load_rows(str(p), bad_rows=bad)
    assert [b["location"] for b in bad] == [f"{p} line 4"] and ds.num_rows == 5
    assert row_location(ds, 3) == f"{p} line 5"


def test_first_rows_keep_their_lines_and_bad_rows_past_them_are_not_counted(tmp_path):
    from data_pipelines.loading import bad_rows_in_use, first_rows

    p = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"q{i}"}) for i in range(6)]
    lines[1] = lines[4] = "{oops"
    p.write_text("\n".join(lines) + "\n")
    bad: list = []
    ds = load_rows(str(p), bad_rows=bad)
    head = first_rows(ds, 2)  # lines 1 and 3
    assert head["prompt"] == ["q0", "q2"] and row_location(head, 1) == f"{p} line 3"
    assert [b["location"] for b in bad_rows_in_use(bad, ds, 2)] == [f"{p} line 2"]
    assert bad_rows_in_use(bad, ds, 4) == bad
