import json
from pathlib import Path

import pytest

from guardmerge.data import discover_tasks, load_task, read_examples
from guardmerge.errors import DataError


def test_reads_jsonl_csv_and_txt(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n')
    (tmp_path / "a.csv").write_text("body,label\nhi,1\nyo,0\n")
    (tmp_path / "a.txt").write_text("hi\n\nyo\n")
    j = read_examples(tmp_path / "a.jsonl")
    assert j.texts == ["hi", "yo"] and j.labels == [1, 0]
    c = read_examples(tmp_path / "a.csv", text_field="body")
    assert c.texts == ["hi", "yo"] and c.labels == [1, 0]
    t = read_examples(tmp_path / "a.txt")
    assert t.texts == ["hi", "yo"] and t.labels is None


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        read_examples(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"row 1: no field 'text'"):
        read_examples(tmp_path / "nofield.jsonl")
    with pytest.raises(DataError, match="unsupported data format"):
        (tmp_path / "x.parquet").write_text("")
        read_examples(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="not found"):
        read_examples(tmp_path / "missing.jsonl")


def test_task_folder(tmp_path: Path) -> None:
    task = tmp_path / "hate"
    task.mkdir()
    (task / "labels.json").write_text(json.dumps({"labels": ["no", "yes"], "source": "x"}))
    (task / "train.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 5}\n')
    assert discover_tasks(tmp_path) == ["hate"]
    td = load_task(task)
    assert td.labels == ["no", "yes"]
    with pytest.raises(DataError, match="label 5 outside 0..1"):
        td.split("train")
