import json
from pathlib import Path

import pytest

from guardmerge.data import discover_tasks, load_task, read_examples, task_texts
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


def _folder(root: Path, name: str, labels: list[str], kind: str, rows: list[dict]) -> Path:
    task = root / name
    task.mkdir()
    (task / "labels.json").write_text(json.dumps({"labels": labels, "type": kind}))
    (task / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return task


def test_multi_label_task_folder(tmp_path: Path) -> None:
    task = _folder(
        tmp_path,
        "emo",
        ["joy", "anger", "neutral"],
        "multi_label",
        [{"text": "a", "labels": [0, 1]}, {"text": "b", "labels": []}],
    )
    td = load_task(task)
    assert td.type == "multi_label"
    ex = td.split("train")
    assert ex.kind == "multi_label" and ex.texts == ["a", "b"] and ex.label_sets == [[0, 1], []] and ex.labels is None
    assert ex.head(1).label_sets == [[0, 1]] and ex.labelled
    (task / "train.jsonl").write_text('{"text": "a", "labels": [0, 3]}\n')
    with pytest.raises(DataError, match=r"train.jsonl, line 1: 'labels' value 3 outside 0..2"):
        td.split("train")
    (task / "train.jsonl").write_text('{"text": "a", "labels": 1}\n')
    with pytest.raises(DataError, match=r"line 1: field 'labels' must be a list of integers"):
        td.split("train")
    (task / "train.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"line 1: no field 'labels'"):
        td.split("train")


def test_token_task_folder(tmp_path: Path) -> None:
    rows = [{"tokens": ["Ann", "lives", "in", "Oslo"], "tags": [1, 0, 0, 3]}, {"tokens": ["hi"], "tags": [0]}]
    task = _folder(tmp_path, "ner", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], "token", rows)
    ex = load_task(task).split("train")
    assert ex.kind == "token" and ex.texts == ["Ann lives in Oslo", "hi"] and ex.tags == [[1, 0, 0, 3], [0]]
    assert ex.words == [["Ann", "lives", "in", "Oslo"], ["hi"]]
    # unlabelled texts of a token task (alignment, layer-wise solves): the words joined
    assert task_texts(task) == ["Ann lives in Oslo", "hi"]
    for bad, message in [
        ({"tokens": ["a", "b"], "tags": [0]}, "2 tokens but 1 tags"),
        ({"tokens": ["a"], "tags": [9]}, "'tags' value 9 outside 0..4"),
        ({"tokens": "a b", "tags": [0]}, "field 'tokens' must be a non-empty list"),
        ({"tokens": ["a b"], "tags": [0]}, "contains whitespace"),
        ({"tokens": ["a"]}, "no field 'tags'"),
    ]:
        (task / "train.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"train.jsonl, line 1: .*{message}"):
            load_task(task).split("train")


def test_unknown_task_type_is_refused(tmp_path: Path) -> None:
    task = _folder(tmp_path, "x", ["a", "b"], "regression", [{"text": "a", "label": 0}])
    with pytest.raises(DataError, match=r"labels.json: 'type' must be one of single_label, multi_label, token"):
        load_task(task)


@pytest.mark.parametrize("label", ["1e400", "9" * 5000, "true", '"12345678901234567890123"', "1.5"])
def test_huge_or_odd_labels_are_one_data_error(tmp_path: Path, label: str) -> None:
    from guardmerge.data import read_examples
    from guardmerge.errors import DataError

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": ' + label + "}\n")
    with pytest.raises(DataError):
        read_examples(path)


def test_labels_json_with_a_huge_number_is_one_data_error(tmp_path: Path) -> None:
    from guardmerge.data import load_task
    from guardmerge.errors import DataError

    (tmp_path / "labels.json").write_text('{"labels": ["a", ' + "9" * 5000 + "]}")
    with pytest.raises(DataError):
        load_task(tmp_path)


def test_data_files_cap_characters_per_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from guardmerge.data import MAX_TEXT_CHARS, read_examples

    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": "a" * (MAX_TEXT_CHARS * 3)}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with caplog.at_level("WARNING"):
        texts = read_examples(path).texts
    assert [len(t) for t in texts] == [MAX_TEXT_CHARS, 1] and "truncated" in caplog.text


def test_deeply_nested_and_binary_data_files_give_clean_errors(tmp_path: Path) -> None:
    from guardmerge.data import read_examples

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl, line 1: invalid JSON: nested too deeply"):
        read_examples(deep)
    for suffix in (".jsonl", ".csv", ".txt"):
        binary = tmp_path / f"bin{suffix}"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 50)
        with pytest.raises(DataError, match="not UTF-8 text"):
            read_examples(binary)


@pytest.mark.parametrize("text", ["null", "123", "1.5", "true", '["x"]'])
def test_jsonl_text_must_be_a_string(tmp_path: Path, text: str) -> None:
    from guardmerge.data import read_examples

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": ' + text + "}\n")
    with pytest.raises(DataError, match=r"d.jsonl, line 3: field 'text' must be a string"):
        read_examples(path)
