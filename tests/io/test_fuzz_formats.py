"""Fuzzing the formats guardmerge reads (issue 21): every malformed safetensors header or body,
shard index, YAML config, JSONL data file and ``labels.json`` ends in a guardmerge error (through
the command line: exit code 2 and one line), never another exception, a hang or unbounded memory.

Examples per property: ``$GUARDMERGE_FUZZ_EXAMPLES`` (default 40). With
``$GUARDMERGE_FUZZ_REPORT`` set to a file, each property adds its counts there (what
``benchmarks/reliability.py`` reports).
"""

from __future__ import annotations

import json
import os
import resource
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardmerge.errors import GuardmergeError

EXAMPLES = int(os.environ.get("GUARDMERGE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example: a hang fails
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
MEMORY_BOUND_MB = 200
"""Most growth of the process's peak resident memory over one property."""

COUNTS: Counter[str] = Counter()
ZOO: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _zoo(zoo: dict[str, Path]) -> None:
    ZOO.update(zoo)  # real folders for the configs' base and expert


@pytest.fixture(autouse=True, scope="module")
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("GUARDMERGE_FUZZ_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        for key, value in COUNTS.items():
            old[key] = old.get(key, 0) + value
        Path(path).write_text(json.dumps(old, indent=2, sort_keys=True))


def outcome(kind: str, fn: Callable[[], Any]) -> None:
    """Run ``fn``: a guardmerge error or success are the only outcomes allowed."""
    try:
        fn()
    except GuardmergeError as exc:
        assert "\n" not in str(exc).strip() or kind == "yaml", str(exc)
        COUNTS[f"{kind}.refused"] += 1
        return
    COUNTS[f"{kind}.accepted"] += 1


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- values ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "X", 3, None]


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A safetensors header (often almost valid) and a body."""
    entries: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.integers(-2, 5), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        size = 4
        for d in shape:
            size *= max(d, 0)
        begin = draw(st.sampled_from([offset, 0, offset + 4, offset - 4, -1]))
        end = draw(st.sampled_from([begin + size, begin + size + 4, begin, 2**63]))
        entry: Any = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if draw(st.booleans()) and draw(st.booleans()):
            entry = draw(json_values)
        entries[draw(st.sampled_from([f"t{i}", "", "a.b", "\u202e", "x" * 300]))] = entry
        offset = max(offset, end if isinstance(end, int) and end < 2**40 else offset)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2), json_values)
        )
    text = json.dumps(entries).encode()
    body = draw(st.binary(max_size=64)) if draw(st.booleans()) else bytes(max(0, min(offset, 4096)))
    length = draw(st.sampled_from([len(text), len(text) + 1, 2**63, 0, len(text) + len(body) + 9]))
    raw = struct.pack("<Q", length) + text + body
    if draw(st.booleans()) and draw(st.booleans()):
        raw = draw(st.binary(max_size=80))
    return raw, body


# -- properties ------------------------------------------------------------------------------


@FUZZ
@given(case=headers())
def test_safetensors_files(tmp_path: Path, case: tuple[bytes, bytes]) -> None:
    from guardmerge.io.safetensors import SafetensorsFile

    path = tmp_path / "f.safetensors"
    path.write_bytes(case[0])
    before = peak_mb()

    def read() -> None:
        with SafetensorsFile(path) as f:
            for key in f.keys():  # noqa: SIM118 (not a dict)
                f.get(key)

    outcome("safetensors", read)
    assert peak_mb() - before < MEMORY_BOUND_MB


@FUZZ
@given(
    index=json_values,
    names=st.lists(
        st.sampled_from(["model.safetensors", "../x.safetensors", "/etc/passwd", "", "a/../../b", "shard.safetensors"]),
        max_size=3,
    ),
)
def test_shard_indexes(tmp_path: Path, zoo: dict[str, Path], index: Any, names: list[str]) -> None:
    import shutil

    from guardmerge.io.formats import weight_files

    folder = tmp_path / "m"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(zoo["hate"], folder)
    shutil.move(str(folder / "model.safetensors"), str(folder / "shard.safetensors"))
    data = {"weight_map": {f"t{i}": n for i, n in enumerate(names)}} if names else index
    (folder / "model.safetensors.index.json").write_text(json.dumps(data))

    def find() -> None:
        files, _ = weight_files(folder)
        assert all(folder.resolve() in f.resolve().parents for f in files)

    outcome("shard_index", find)


yaml_values = st.recursive(
    st.one_of(scalars, st.sampled_from(["!!python/object:os.system", "*anchor", "&a [1]", "{", "[", "1e400", "~"])),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["base_model", "experts", "method", "parameters", "model", "task", "weight", "heads", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=15,
)


near_configs = st.fixed_dictionaries(
    {
        "base_model": st.one_of(st.just("BASE"), scalars),
        "experts": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "model": st.one_of(st.just("EXPERT"), scalars),
                        "task": st.one_of(st.sampled_from(["hate", "a b", "x\n", ""]), scalars),
                    },
                    optional={"weight": scalars, "benign": json_values, "thresholds": json_values, "data": scalars},
                ),
                max_size=3,
            ),
            json_values,
        ),
    },
    optional={
        "method": st.sampled_from(["ties", "task_arithmetic", "nope", "pcb"]),
        "parameters": st.one_of(
            st.dictionaries(st.sampled_from(["density", "scaling", "x", "consensus"]), scalars, max_size=3), json_values
        ),
        "heads": st.sampled_from(["multi", "hm3", "shared", "x"]),
        "share_layers": scalars,
        "align_heads": json_values,
    },
)


@FUZZ
@given(
    doc=st.one_of(yaml_values, near_configs), raw=st.text(max_size=80), mode=st.sampled_from(["dump", "dump", "raw"])
)
def test_yaml_configs(tmp_path: Path, doc: Any, raw: str, mode: str) -> None:
    from guardmerge.config import load_config

    path = tmp_path / "merge.yaml"
    text = yaml.safe_dump(doc) if mode == "dump" else raw
    path.write_text(text.replace("BASE", str(ZOO["base"])).replace("EXPERT", str(ZOO["hate"])))
    outcome("yaml", lambda: load_config(path))


rows = st.fixed_dictionaries(
    {},
    optional={
        "text": st.one_of(st.text(max_size=20), scalars),
        "label": st.one_of(st.integers(-2, 4), scalars),
        "labels": st.one_of(st.lists(st.integers(-1, 4), max_size=3), json_values),
        "tokens": st.one_of(st.lists(st.text(max_size=6), max_size=4), json_values),
        "tags": st.one_of(st.lists(st.integers(-1, 4), max_size=4), json_values),
    },
)
lines_of = st.one_of(rows.map(json.dumps), rows.map(json.dumps), json_values.map(json.dumps), st.text(max_size=30))


@FUZZ
@given(lines=st.lists(lines_of, max_size=6), kind=st.sampled_from(["single", "multi", "token", "texts"]))
def test_jsonl_data(tmp_path: Path, lines: list[str], kind: str) -> None:
    from guardmerge.data import read_examples, read_multi_label_examples, read_token_examples, task_texts

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    readers = {
        "single": lambda: read_examples(path),
        "multi": lambda: read_multi_label_examples(path, 3),
        "token": lambda: read_token_examples(path, 3),
        "texts": lambda: task_texts(path),
    }
    outcome("jsonl", readers[kind])


label_files = st.fixed_dictionaries(
    {"labels": st.one_of(st.lists(st.one_of(st.text(max_size=6), scalars), max_size=4), json_values)},
    optional={"type": st.sampled_from(["single_label", "multi_label", "token", "other", 5])},
)


@FUZZ
@given(meta=st.one_of(label_files, label_files, json_values), split=st.lists(rows.map(json.dumps), max_size=3))
def test_labels_json(tmp_path: Path, meta: Any, split: list[str]) -> None:
    from guardmerge.data import load_task

    folder = tmp_path / "task"
    folder.mkdir(exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(meta))
    (folder / "test.jsonl").write_text("\n".join(split) + "\n")
    outcome("labels_json", lambda: load_task(folder).split("test"))


@FUZZ
@given(case=headers())
def test_commands_answer_one_line(tmp_path: Path, zoo: dict[str, Path], case: tuple[bytes, bytes]) -> None:
    """Through the command line, a broken weights file is exit code 2 and one ``error:`` line."""
    import contextlib
    import io
    import shutil
    import sys

    from guardmerge.cli import main

    folder = tmp_path / "m"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(zoo["hate"], folder)
    (folder / "model.safetensors").write_bytes(case[0])
    err = io.StringIO()
    sys.argv = ["guardmerge", "predict", str(folder), "hello"]
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main()
    lines = [x for x in err.getvalue().splitlines() if x.startswith("error:")]
    assert info.value.code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    COUNTS["cli.refused"] += 1
