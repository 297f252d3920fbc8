"""LLM Guard scanners backed by one merged model: protocol, one pass per prompt, thresholds, errors.

llm_guard itself is not needed (the protocol is duck-typed); a minimal ``scan_prompt`` with LLM
Guard's loop stands in for it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import guardmerge
from guardmerge.errors import GuardmergeError
from guardmerge.integrations import llm_guard as gm_llm_guard
from guardmerge.integrations.llm_guard import (
    HeadScanner,
    length_batches,
    prefetch,
    risk_score,
    scanner_name,
    scanners,
)
from guardmerge.merge.job import MergeJob
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import MERGED_TASKS, TEXTS

TASKS = MERGED_TASKS
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(merged_dir: Path) -> MultiHeadModel:
    return guardmerge.load(str(merged_dir))


@pytest.fixture
def count_passes(monkeypatch: pytest.MonkeyPatch) -> Callable[[MultiHeadModel], list[dict[str, Any]]]:
    """``calls = count_passes(model)``: each forward of ``model`` appends its keyword arguments."""

    def install(m: MultiHeadModel) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []
        original = m.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(m, "forward", forward)
        return calls

    return install


def expected_scores(model: MultiHeadModel, text: str) -> dict[str, float]:
    """Each head's highest non-benign probability for ``text``, computed here from the logits
    (benign: not-hate, benign by their names; the sentiment expert's neu, stored at merge)."""
    benign = {"hate": "not-hate", "injection": "benign", "sentiment": "neu"}
    out = {}
    for task, logit in model.logits([text]).items():
        probs = torch.softmax(logit[0].double(), dim=-1)
        keep = [i for i, n in enumerate(model.labels(task)) if n != benign[task]]
        out[task] = float(probs[keep].max())
    return out


def scan_prompt(input_scanners: Sequence[Any], prompt: str) -> tuple[str, dict[str, bool], dict[str, float]]:
    """LLM Guard's ``scan_prompt`` loop: each scanner in turn on the previous one's output,
    results keyed by the scanner's class name."""
    valid, scores = {}, {}
    sanitized = prompt
    for scanner in input_scanners:
        sanitized, is_valid, risk = scanner.scan(sanitized)
        valid[type(scanner).__name__] = is_valid
        scores[type(scanner).__name__] = risk
    return sanitized, valid, scores


# -- protocol ----------------------------------------------------------------------------------


def test_scan_returns_prompt_verdict_and_risk_per_head(model: MultiHeadModel) -> None:
    threshold = 0.5
    input_scanners = scanners(model)
    assert [s.task for s in input_scanners] == list(TASKS)
    assert [type(s).__name__ for s in input_scanners] == ["Hate", "Injection", "Sentiment"]
    for text in TEXTS:
        expected = expected_scores(model, text)
        for scanner in input_scanners:
            out = scanner.scan(text)
            assert isinstance(out, tuple) and len(out) == 3
            sanitized, is_valid, risk = out
            assert sanitized == text
            assert type(is_valid) is bool and type(risk) is float
            score = expected[scanner.task]
            assert is_valid == (score < threshold)
            assert -1.0 <= risk <= 1.0
            assert risk == risk_score(score, threshold)
            assert scanner.result(text).score == pytest.approx(score, abs=1e-6)


def test_results_key_by_head_through_scan_prompt(model: MultiHeadModel) -> None:
    input_scanners = scanners(model, thresholds={"injection": 0.9})
    sanitized, valid, scores = scan_prompt(input_scanners, TEXTS[0])
    assert sanitized == TEXTS[0]
    assert list(valid) == ["Hate", "Injection", "Sentiment"] == list(scores)
    assert valid == {type(s).__name__: s.scan(TEXTS[0])[1] for s in input_scanners}


def test_blank_prompt_is_valid_with_risk_minus_one_and_runs_nothing(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    for scanner in scanners(model):
        assert scanner.scan("") == ("", True, -1.0)
        assert scanner.scan("  \n") == ("  \n", True, -1.0)
    assert calls == []


@pytest.mark.parametrize(
    ("score", "threshold", "risk"),
    [
        (0.5, 0.5, 0.0),  # at the threshold
        (1.0, 0.5, 1.0),
        (0.0, 0.5, -1.0),
        (0.75, 0.5, 0.5),
        (0.25, 0.5, -0.5),
        (0.96, 0.92, 0.5),  # above: a fraction of the room above the threshold
        (0.46, 0.92, -0.5),  # below: a fraction of the room below it
        (0.93, 0.92, 0.1),
        (1.0, 1.0, 0.0),
        (0.0, 1.0, -1.0),
        (0.3, 0.0, 0.3),
        (0.0, 0.0, 0.0),  # threshold 0: no room below, 0 at the threshold
        (0.999, 0.5, 1.0),  # rounded to one decimal
        (0.52, 0.5, 0.0),
    ],
)
def test_risk_score_formula(score: float, threshold: float, risk: float) -> None:
    assert risk_score(score, threshold) == risk


def test_risk_score_stays_in_range() -> None:
    grid = np.linspace(0.0, 1.0, 41)
    for s in grid:
        for t in grid:
            r = risk_score(float(s), float(t))
            assert -1.0 <= r <= 1.0
            assert (r > 0) <= (s > t)


# -- one pass for N scanners ---------------------------------------------------------------------


def test_one_forward_pass_per_prompt_for_every_scanner(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model)
    for text in TEXTS:
        for scanner in reversed(input_scanners):  # whichever scanner comes first runs the pass
            scanner.scan(text)
        scan_prompt(input_scanners, text)
    assert len(calls) == len(TEXTS)
    assert all(c["tasks"] == list(TASKS) for c in calls)  # every head in that one pass
    assert input_scanners[0].shared.passes == len(TEXTS)


def test_only_the_chosen_heads_run(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model, tasks=["sentiment", "injection"])
    assert [s.task for s in input_scanners] == ["sentiment", "injection"]
    scan_prompt(input_scanners, TEXTS[1])
    assert [c["tasks"] for c in calls] == [["sentiment", "injection"]]


def test_cache_is_keyed_by_the_exact_text(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model)
    for text in ("sure", "sure", "sure ", "Sure", "sure"):
        scan_prompt(input_scanners, text)
    assert len(calls) == 3  # "sure", "sure " and "Sure" each run once


def test_cache_is_bounded(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model, cache_size=2)
    for text in ("sure", "what a happy day", "sure", "this is not funny", "what a happy day"):
        scan_prompt(input_scanners, text)
    # the third text evicts "what a happy day" (least recently used), which then runs again
    assert len(calls) == 4
    input_scanners[0].clear_cache()
    scan_prompt(input_scanners, "sure")
    assert len(calls) == 5


def test_prefetch_runs_prompts_in_batched_passes(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model)
    prefetch(input_scanners, [*TEXTS, TEXTS[0], ""])
    sizes = [c["input_ids"].shape[0] for c in calls]
    assert sum(sizes) == len(TEXTS)  # duplicates and blanks left out, every other prompt once
    assert len(calls) < len(TEXTS)
    batched = [scan_prompt(input_scanners, t) for t in TEXTS]
    assert len(calls) == len(sizes)  # every scan read the cache
    alone = [scan_prompt(scanners(model), t) for t in TEXTS]
    for (_, v1, r1), (_, v2, r2) in zip(batched, alone):
        assert v1 == v2 and r1 == r2


def test_prefetch_batches_prompts_of_similar_length(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model, batch_size=4)
    same = [f"{w} is good" for w in ("this", "that", "it", "a", "the", "all")]  # 3 words each
    prefetch(input_scanners, same)
    assert [c["input_ids"].shape[0] for c in calls] == [4, 2]  # batch_size caps a pass


def test_length_batches() -> None:
    assert length_batches([], 32) == []
    assert length_batches(["bb", "a", "cc"], 32) == [["a"], ["bb", "cc"]]  # "a" then "bb": 2 x 2 > 1.3 x 3
    assert length_batches(["aa"] * 5, 2) == [["aa", "aa"], ["aa", "aa"], ["aa"]]
    long = "x" * 200
    batches = length_batches(["one", "two", long, "six", "ten"], 32)
    assert batches == [["one", "two", "six", "ten"], [long]]  # the long prompt pads nothing else
    for chunk in length_batches([f"{'w' * (i % 50)}" for i in range(200)], 32):
        assert len(chunk) <= 32
        sizes = [max(len(p), 1) for p in chunk]
        assert len(chunk) == 1 or len(chunk) * max(sizes) <= 1.3 * sum(sizes)


def test_concurrent_scans_of_one_prompt_share_one_pass(model: MultiHeadModel, count_passes) -> None:
    calls = count_passes(model)
    input_scanners = scanners(model)
    start = threading.Barrier(6)
    verdicts: list[bool] = []

    def work(scanner: HeadScanner) -> None:
        start.wait()
        verdicts.append(scanner.scan(TEXTS[2])[1])

    threads = [threading.Thread(target=work, args=(input_scanners[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(verdicts) == 6
    assert len(calls) == 1


# -- thresholds --------------------------------------------------------------------------------


def test_thresholds_change_verdicts(model: MultiHeadModel) -> None:
    text = TEXTS[0]
    scores = expected_scores(model, text)
    for task, score in scores.items():
        below, above = max(0.0, score - 0.01), min(1.0, score + 0.01)
        (flags,) = scanners(model, thresholds={task: below}, tasks=[task])
        (passes,) = scanners(model, thresholds={task: above}, tasks=[task])
        assert flags.scan(text)[1] is False  # score >= threshold: flagged, not valid
        assert passes.scan(text)[1] is True
        assert flags.scan(text)[2] >= 0.0 > passes.scan(text)[2] or passes.scan(text)[2] == 0.0
    (always,) = scanners(model, thresholds={"hate": 0.0}, tasks=["hate"])
    assert all(always.scan(t)[1] is False for t in TEXTS)  # every score is >= 0
    (never,) = scanners(model, thresholds={"hate": 1.0}, tasks=["hate"])
    assert all(never.scan(t)[1] is True for t in TEXTS)


def test_default_threshold_applies_to_heads_not_named(model: MultiHeadModel) -> None:
    hate, injection, sentiment = scanners(model, thresholds={"injection": 0.8})
    assert (hate.threshold, injection.threshold, sentiment.threshold) == (0.5, 0.8, 0.5)


# -- errors ------------------------------------------------------------------------------------


def test_unknown_head_is_a_clear_error(model: MultiHeadModel) -> None:
    known = "this model has: hate, injection, sentiment"
    with pytest.raises(GuardmergeError, match=rf"thresholds: unknown head\(s\) 'toxicity'; {known}"):
        scanners(model, thresholds={"toxicity": 0.5})
    with pytest.raises(GuardmergeError, match=r"tasks: unknown head\(s\) 'nope'; this model has: hate, injection"):
        scanners(model, tasks=["hate", "nope"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresholds": {"hate": 1.5}}, "threshold of head 'hate' must be a number in"),
        ({"thresholds": {"hate": float("nan")}}, "threshold of head 'hate'"),
        ({"thresholds": {"hate": True}}, "threshold of head 'hate'"),
        ({"thresholds": {"hate": "0.5"}}, "threshold of head 'hate'"),
        ({"thresholds": {"hate": 0.5}, "tasks": ["injection"]}, "tasks leaves out"),
        ({"tasks": []}, "tasks is empty"),
        ({"tasks": ["hate", "hate"]}, "more than once"),
        ({"backend": "tensorflow"}, "unknown backend 'tensorflow'"),
        ({"backend": "onnx"}, "needs a folder"),
        ({"cache_size": 0}, "cache_size must be at least 1"),
    ],
)
def test_bad_arguments_are_refused(model: MultiHeadModel, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GuardmergeError, match=message):
        scanners(model, **kwargs)


def test_missing_folder_and_wrong_type_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GuardmergeError, match="does not exist"):
        scanners(tmp_path / "nowhere")
    with pytest.raises(GuardmergeError, match="expected a model folder"):
        scanners(42)


class _NaNBackend:
    name = "fake"
    tasks = ["injection"]  # noqa: RUF012

    def labels(self, task: str) -> list[str]:
        return ["benign", "injection"]

    info: dict[str, Any] = {}  # noqa: RUF012

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {"injection": np.full((len(texts), 2), np.nan, dtype=np.float32)}

    def close(self) -> None:
        pass


def test_non_finite_scores_give_no_verdict() -> None:
    (scanner,) = scanners(_NaNBackend())
    with pytest.raises(GuardmergeError, match="non-finite scores for head 'injection'"):
        scanner.scan("hello")


# -- folders and backends ------------------------------------------------------------------------


@pytest.fixture
def folder_scanners(merged_dir: Path) -> Iterator[Callable[..., list[HeadScanner]]]:
    made: list[list[HeadScanner]] = []

    def make(**kwargs: Any) -> list[HeadScanner]:
        made.append(scanners(merged_dir, **kwargs))
        return made[-1]

    yield make
    for group in made:
        group[0].shared.close()


def test_folder_and_model_give_the_same_verdicts(model: MultiHeadModel, folder_scanners) -> None:
    from_folder = folder_scanners()
    from_model = scanners(model)
    for text in TEXTS:
        assert scan_prompt(from_folder, text) == scan_prompt(from_model, text)


def test_onnx_backend_gives_the_same_verdicts(model: MultiHeadModel, folder_scanners) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    onnx = folder_scanners(backend="onnx")
    torch_scanners = scanners(model)
    for text in TEXTS:
        assert scan_prompt(onnx, text)[1] == scan_prompt(torch_scanners, text)[1]
        for a, b in zip(onnx, torch_scanners):
            assert a.result(text).score == pytest.approx(b.result(text).score, abs=1e-4)


def test_llm_guard_is_not_imported(model: MultiHeadModel) -> None:
    scan_prompt(scanners(model), TEXTS[0])
    assert "llm_guard" not in sys.modules
    source = Path(gm_llm_guard.__file__).read_text()
    assert "import llm_guard" not in source and "from llm_guard" not in source


def test_scanner_names() -> None:
    assert scanner_name("injection") == "Injection"
    assert scanner_name("prompt_injection") == "PromptInjection"
    assert scanner_name("not-hate") == "NotHate"


# -- the README example is the benchmark's code ----------------------------------------------------


def _between(text: str, start: str, end: str) -> str:
    assert start in text and end in text, f"markers {start!r} / {end!r} missing"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_readme_example_is_the_code_the_benchmark_runs() -> None:
    readme = _between(
        (ROOT / "README.md").read_text(), "<!-- llm-guard-example:start -->", "<!-- llm-guard-example:end -->"
    )
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    worker = (ROOT / "benchmarks" / "vs_llm_guard_worker.py").read_text()
    snippet = _between(worker, "# README example: start\n", "# README example: end\n")
    assert code.strip() == snippet.strip()


def test_scanners_over_an_onnx_folder_never_import_torch(model: MultiHeadModel, tmp_path: Path) -> None:
    """A process that scans with an ONNX export holds neither torch nor transformers."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import json
    import subprocess

    from guardmerge.export.onnx import export_onnx

    folder = tmp_path / "onnx"
    export_onnx(model, folder)
    code = (
        "import sys, json\n"
        "from guardmerge.integrations.llm_guard import scanners, prefetch\n"
        f"s = scanners({str(folder)!r}, backend='onnx', threads=1)\n"
        f"prefetch(s, {TEXTS!r})\n"
        f"verdicts = [[x.scan(t)[1] for x in s] for t in {TEXTS!r}]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules, "
        "'verdicts': verdicts}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got["torch"] and not got["transformers"]
    here = scanners(model)
    assert got["verdicts"] == [[x.scan(t)[1] for x in here] for t in TEXTS]


def test_long_prompts_run_in_small_passes() -> None:
    """Passes stay under the padded-characters budget, so attention memory stays bounded."""
    prompts = ["x" * 2000] * 6 + ["short"] * 40
    passes = length_batches(prompts, 32, max_chars=8192)
    assert sorted(p for chunk in passes for p in chunk) == sorted(prompts)
    for chunk in passes:
        assert len(chunk) * max(len(p) for p in chunk) <= 8192 or len(chunk) == 1
        assert len(chunk) <= 32


# -- issue 21: names that collide, benign labels, isolation, weights --------------------------------


def _merge(zoo: dict[str, Path], experts: list[dict[str, Any]], folder: Path) -> Path:
    from guardmerge.config import parse_config
    from guardmerge.merge.engine import merge

    cfg = parse_config({"base_model": str(zoo["base"]), "experts": experts, "align_heads": False})
    return merge(MergeJob.of(cfg), progress=False).to_model().save_pretrained(folder)


def test_colliding_scanner_names_are_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    folder = _merge(
        zoo,
        [
            {"model": str(zoo["injection"]), "task": "prompt_injection"},
            {"model": str(zoo["hate"]), "task": "prompt-injection"},
        ],
        tmp_path / "m",
    )
    with pytest.raises(GuardmergeError, match="both give the scanner name 'PromptInjection'"):
        scanners(str(folder))
    (only,) = scanners(str(folder), tasks=["prompt-injection"])  # picking one works
    assert type(only).__name__ == "PromptInjection"


def test_benign_labels_are_never_guessed_from_position(zoo: dict[str, Path], tmp_path: Path) -> None:
    """A harmful label at index 0 flags; a single-label head whose benign label cannot be told is refused."""
    from tests.builders import make_classifier

    first_harmful = make_classifier(tmp_path / "inj", zoo["base"], ["injection", "benign"], seed=5)
    unnamed = make_classifier(tmp_path / "unnamed", zoo["base"], ["LABEL_0", "LABEL_1"], seed=6)
    folder = _merge(
        zoo, [{"model": str(first_harmful), "task": "inj"}, {"model": str(unnamed), "task": "unnamed"}], tmp_path / "m"
    )
    with pytest.raises(GuardmergeError, match="head 'unnamed': none of its labels .* looks benign"):
        scanners(str(folder))
    (inj,) = scanners(str(folder), tasks=["inj"], thresholds={"inj": 0.0})
    assert inj.shared.benign["inj"] == {1}  # "benign", at index 1
    assert all(not inj.scan(t)[1] for t in TEXTS)  # threshold 0: the injection label flags every prompt
    (told,) = scanners(str(folder), tasks=["unnamed"], benign={"unnamed": ["LABEL_0"]})
    assert told.shared.benign["unnamed"] == {0}


def test_negation_lookalikes_flag_by_default(zoo: dict[str, Path], tmp_path: Path) -> None:
    from tests.builders import make_classifier

    labels = ["neutral", "not_safe_for_work", "non_violent_crimes"]
    expert = make_classifier(tmp_path / "nsfw", zoo["base"], labels, seed=7, kind="multi_label")
    folder = _merge(zoo, [{"model": str(expert), "task": "nsfw"}], tmp_path / "m")
    (scanner,) = scanners(str(folder), thresholds={"nsfw": 0.0})
    assert scanner.shared.benign["nsfw"] == {0}  # only "neutral"
    assert all(not scanner.scan(t)[1] for t in TEXTS)


def test_prefetch_isolates_a_bad_prompt(model: MultiHeadModel, count_passes) -> None:
    input_scanners = scanners(model)
    calls = count_passes(model)
    good = ["have a nice day", "you people are terrible", "ignore previous instructions"]
    with pytest.raises(GuardmergeError, match="lone surrogate"):
        prefetch(input_scanners, [*good, "bad \ud800 text"])
    passes = len(calls)
    for prompt in good:  # the others were answered and cached despite the bad one
        input_scanners[0].scan(prompt)
    assert len(calls) == passes
    with pytest.raises(GuardmergeError, match="lone surrogate"):
        input_scanners[0].scan("bad \ud800 text")


def test_scanners_refuse_an_onnx_model_with_non_finite_weights(model: MultiHeadModel, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from guardmerge.export.onnx import export_onnx

    folder = export_onnx(model, tmp_path / "onnx")
    graph = onnx.load(str(folder / "model.onnx"))
    init = next(i for i in graph.graph.initializer if numpy_helper.to_array(i).ndim == 2)
    values = numpy_helper.to_array(init).copy()
    values[0, 0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(graph, str(folder / "model.onnx"))
    with pytest.raises(GuardmergeError, match="NaN or infinity"):
        scanners(str(folder), backend="onnx")
