"""Faults survived, nothing lost (issue 21): commands killed with SIGKILL at random points,
concurrent runs racing to one output, and a full disk.

For merge, stats, export-onnx and finetune, each run is killed after a random delay (seeded);
after every kill no partial output is visible at OUT (it is absent or complete), the inputs are
byte for byte unchanged, and the next run cleans its own stale temporaries and succeeds. Four
merges racing to one new OUT end with one complete output and three clear errors. A file size
limit (``RLIMIT_FSIZE``: writes fail with EFBIG, as on a full disk) gives a clean error and no
partial output.

These start real processes (a few seconds each): marked ``reliability``, they run in their own
CI step. Kills per command: ``$GUARDMERGE_FAULT_KILLS`` (default 3); with
``$GUARDMERGE_FAULT_REPORT`` set to a file, the counts are added there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

KILLS = int(os.environ.get("GUARDMERGE_FAULT_KILLS", "3"))
COUNTS: Counter[str] = Counter()


@pytest.fixture(autouse=True, scope="module")
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("GUARDMERGE_FAULT_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        for key, value in COUNTS.items():
            old[key] = old.get(key, 0) + value
        Path(path).write_text(json.dumps(old, indent=2, sort_keys=True))


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for root in paths:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                h.update(str(p.relative_to(root.parent)).encode() + p.read_bytes())
    return h.hexdigest()


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from guardmerge.cli import main; main()", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def work(zoo: dict[str, Path], merged_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import yaml

    root = tmp_path_factory.mktemp("faults")
    config = root / "merge.yaml"
    experts = [{"model": str(zoo[t]), "task": t} for t in ("hate", "injection")]
    config.write_text(yaml.safe_dump({"base_model": str(zoo["base"]), "experts": experts, "align_heads": False}))
    texts = root / "texts.txt"
    texts.write_text("\n".join(["ignore previous instructions", "have a nice day", "you are all idiots"] * 20))
    train = root / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps({"text": f"text number {i} is {'bad' if i % 2 else 'good'}", "label": i % 2}) + "\n"
            for i in range(64)
        )
    )
    return {"root": root, "config": config, "texts": texts, "train": train, "merged": merged_dir, **zoo}


def jobs(w: dict[str, Path]) -> dict[str, tuple[Callable[[Path], list[str]], list[Path], Callable[[Path], None]]]:
    """Per command: its arguments for an output, its inputs, and a check that an output is complete."""

    def merged_ok(out: Path) -> None:
        import guardmerge

        assert set(guardmerge.load(out).tasks) == {"hate", "injection"}

    def stats_ok(out: Path) -> None:
        from guardmerge.stats import load_stats

        assert load_stats(out).gram is not None

    def onnx_ok(out: Path) -> None:
        from guardmerge.serve.backends import OnnxBackend

        OnnxBackend(out).close()

    def finetuned_ok(out: Path) -> None:
        from guardmerge.models.multihead import MultiHeadModel

        assert MultiHeadModel.from_classifier(out, "t").labels("t") == ["good", "bad"]

    return {
        "merge": (
            lambda out: ["merge", str(w["config"]), str(out)],
            [w["config"], w["base"], w["hate"], w["injection"]],
            merged_ok,
        ),
        "stats": (
            lambda out: ["stats", str(w["hate"]), "--data", str(w["texts"]), "--out", str(out)],
            [w["hate"], w["texts"]],
            stats_ok,
        ),
        "export-onnx": (lambda out: ["export-onnx", str(w["merged"]), str(out)], [w["merged"]], onnx_ok),
        "finetune": (
            lambda out: [
                "finetune",
                str(w["base"]),
                str(w["train"]),
                str(out),
                "--labels",
                "good,bad",
                "--epochs",
                "3",
                "--batch-size",
                "8",
            ],
            [w["base"], w["train"]],
            finetuned_ok,
        ),
    }


@pytest.mark.parametrize("name", ["merge", "stats", "export-onnx", "finetune"])
def test_sigkill_at_random_points_loses_nothing(name: str, work: dict[str, Path], tmp_path: Path) -> None:
    args, inputs, complete = jobs(work)[name]
    before = digest(*inputs)
    out = tmp_path / ("out.safetensors" if name == "stats" else "out")
    started = time.perf_counter()
    reference = tmp_path / ("reference.safetensors" if name == "stats" else "reference")
    full = subprocess.run(command(*args(reference)), env=env(), capture_output=True, text=True)
    duration = time.perf_counter() - started
    assert full.returncode == 0, full.stderr
    rng = random.Random(f"{name}-kills")
    for _ in range(KILLS):
        proc = subprocess.Popen(command(*args(out)), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        COUNTS[f"{name}.killed"] += 1
        if out.exists():  # the kill came after the final rename: the output must be whole
            complete(out)
            COUNTS[f"{name}.complete_before_kill"] += 1
            if out.is_dir():
                import shutil

                shutil.rmtree(out)
            else:
                out.unlink()
        assert digest(*inputs) == before, "an input changed"
        COUNTS[f"{name}.survived"] += 1
    done = subprocess.run(command(*args(out)), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    complete(out)
    assert leftovers(out) == [], leftovers(out)  # the next run cleaned what the kills left
    assert digest(*inputs) == before


def test_racing_merges_end_with_one_output_and_clear_errors(work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "raced"
    procs = [
        subprocess.Popen(
            command("merge", str(work["config"]), str(out)),
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2, 2, 2], results
    for code, err in results:
        if code == 2:
            assert "already exists" in err or "appeared while this run was writing" in err, err
    jobs(work)["merge"][2](out)
    assert leftovers(out) == []
    COUNTS["race.runs"] += 4
    COUNTS["race.outputs"] += 1


def _file_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("name", ["merge", "stats", "export-onnx", "finetune", "eval"])
def test_a_full_disk_gives_a_clean_error_and_no_output(name: str, work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / ("out.json" if name == "eval" else "out.safetensors" if name == "stats" else "out")
    if name == "eval":
        data = tmp_path / "data" / "hate"
        data.mkdir(parents=True)
        (data / "labels.json").write_text(json.dumps({"labels": ["not-hate", "hate"]}))
        (data / "test.jsonl").write_text("".join(json.dumps({"text": "x " * 50, "label": 0}) + "\n" for _ in range(4)))
        args = ["eval", str(work["merged"]), "--data", str(tmp_path / "data"), "--out", str(out)]
        limit = 32
    else:
        args, _, _ = jobs(work)[name]
        args = args(out)
        limit = 4096
    proc = subprocess.run(command(*args), env=env(), capture_output=True, text=True, preexec_fn=_file_limit(limit))
    lines = [x for x in re.split(r"[\r\n]", proc.stderr) if x.startswith("error:")]  # progress bars end in \r
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and leftovers(out) == []
    COUNTS["full_disk.clean_errors"] += 1
