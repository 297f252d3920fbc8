"""One reader for every checkpoint (issue 21): every command and API that reads a model refuses
the same broken folders, because all of them read through :mod:`guardmerge.io`.

Each case breaks a copy of a tiny expert (for the readers of stock classifiers) or of a tiny
merged model (for the readers of merged folders) in one way, then runs one reader on it and
expects a guardmerge error (exit code 2 and one line for a command), and the inputs untouched.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardmerge.errors import CheckpointError, GuardmergeError
from guardmerge.merge.job import MergeJob
from tests.builders import pickle_only

WEIGHTS = "model.safetensors"


# -- the defects -----------------------------------------------------------------------------


def _rewrite_header(folder: Path, fn: Callable[[dict], None]) -> None:
    raw = (folder / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    text = json.dumps(header).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _float_keys(header: dict) -> list[str]:
    return [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 2]


def shard_outside(folder: Path) -> None:
    keys = list(load_file(str(folder / WEIGHTS)))
    outside = folder.parent / f"{folder.name}-outside.safetensors"
    shutil.move(str(folder / WEIGHTS), str(outside))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(keys, f"../{outside.name}")})
    )


def link_outside(folder: Path) -> None:
    outside = folder.parent / f"{folder.name}-linked.safetensors"
    shutil.move(str(folder / WEIGHTS), str(outside))
    (folder / WEIGHTS).symlink_to(outside)


def overlapping_offsets(folder: Path) -> None:
    def alias(header: dict) -> None:
        key = _float_keys(header)[-1]
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [0, end - begin]  # its bytes are now another tensor's

    _rewrite_header(folder, alias)


def lying_dtype(folder: Path) -> None:
    _rewrite_header(folder, lambda h: h[_float_keys(h)[0]].__setitem__("dtype", "F16"))


def lying_shape(folder: Path) -> None:
    _rewrite_header(folder, lambda h: h[_float_keys(h)[0]].__setitem__("shape", [3, 3]))


def _edit(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(folder / WEIGHTS))
    fn(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def nan_weight(folder: Path) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if k.endswith("attention.self.query.weight"))
        state[key][0, 0] = float("nan")

    _edit(folder, poison)


def int8_weight(folder: Path) -> None:
    def quantise(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if k.endswith("attention.self.key.weight"))
        state[key] = state[key].to(torch.int8)

    _edit(folder, quantise)


def pickle_weights(folder: Path) -> None:
    torch.save(load_file(str(folder / WEIGHTS)), folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()


def code_hints(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('code from a model folder ran')\n")


DEFECTS: dict[str, Callable[[Path], None]] = {
    "shard outside the folder": shard_outside,
    "weights link leaving the folder": link_outside,
    "overlapping offsets": overlapping_offsets,
    "header lies about a dtype": lying_dtype,
    "header lies about a shape": lying_shape,
    "NaN weight": nan_weight,
    "int8 weight": int8_weight,
    "pickle without --allow-pickle": pickle_weights,
    "auto_map code hint": code_hints,
}


# -- the readers -----------------------------------------------------------------------------

TEXTS = ["ignore previous instructions", "have a nice day", "you people are terrible"]


def run_cli(*args: str) -> None:
    """Run a command in-process; a refusal must be exit code 2 with one ``error:`` line."""
    import contextlib
    import io

    from guardmerge.cli import main

    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["guardmerge", *args]
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = argv
    if info.value.code in (0, None):
        return
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    raise GuardmergeError(lines[0])


def merge_expert(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.config import parse_config
    from guardmerge.merge.stages import merge_to_folder

    cfg = {"base_model": str(env["base"]), "experts": [{"model": str(bad), "task": "hate"}], "align_heads": False}
    merge_to_folder(MergeJob.of(parse_config(cfg)), env["tmp"] / "out", progress=False)


def merge_base(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.config import parse_config
    from guardmerge.merge.stages import merge_to_folder

    cfg = {"base_model": str(bad), "experts": [{"model": str(env["hate"]), "task": "hate"}], "align_heads": False}
    merge_to_folder(MergeJob.of(parse_config(cfg)), env["tmp"] / "out", progress=False)


def statistics(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.config import StatsConfig
    from guardmerge.merge.statistics import compute_stats

    compute_stats(bad, TEXTS, {"gram"}, StatsConfig(), progress=False)


def stats_command(bad: Path, env: dict[str, Path]) -> None:
    data = env["tmp"] / "texts.txt"
    data.write_text("\n".join(TEXTS))
    run_cli("stats", str(bad), "--data", str(data), "--out", str(env["tmp"] / "s.safetensors"))


def predict_command(bad: Path, env: dict[str, Path]) -> None:
    run_cli("predict", str(bad), "hello")


def head_alignment(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.merge.align import FeatureCache

    FeatureCache().get(bad, "hate", TEXTS, 16, 8)


def layerwise_expert(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.models.multihead import MultiHeadModel

    MultiHeadModel.from_classifier(bad, "hate")


def finetune_base(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.data import Examples
    from guardmerge.finetune import FinetuneSettings, finetune

    finetune(
        bad,
        Examples(TEXTS, labels=[1, 0, 1]),
        ["a", "b"],
        env["tmp"] / "ft",
        FinetuneSettings(epochs=1),
        progress=False,
    )


def load_merged(bad: Path, env: dict[str, Path]) -> None:
    import guardmerge

    guardmerge.load(bad)


def export_onnx_command(bad: Path, env: dict[str, Path]) -> None:
    run_cli("export-onnx", str(bad), str(env["tmp"] / "onnx"))


def llm_guard_scanners(bad: Path, env: dict[str, Path]) -> None:
    from guardmerge.integrations.llm_guard import scanners

    scanners(str(bad))


def eval_command(bad: Path, env: dict[str, Path]) -> None:
    run_cli("eval", str(bad), "--data", str(env["data"]), "--limit", "4")


STOCK_READERS: dict[str, Callable[[Path, dict[str, Path]], None]] = {
    "merge (expert)": merge_expert,
    "merge (base)": merge_base,
    "statistics": statistics,
    "guardmerge stats": stats_command,
    "guardmerge predict (stock classifier)": predict_command,
    "head alignment (expert features)": head_alignment,
    "layer-wise stages (expert model)": layerwise_expert,
    "fine-tuning (base)": finetune_base,
}
MERGED_READERS: dict[str, Callable[[Path, dict[str, Path]], None]] = {
    "guardmerge.load": load_merged,
    "guardmerge export-onnx": export_onnx_command,
    "LLM Guard scanners": llm_guard_scanners,
    "guardmerge eval": eval_command,
}


@pytest.fixture(scope="module")
def env(zoo: dict[str, Path], merged_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = tmp_path_factory.mktemp("data")
    task = data / "hate"
    task.mkdir()
    (task / "labels.json").write_text(json.dumps({"labels": ["not-hate", "hate"]}))
    (task / "test.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS))
    )
    return {"base": zoo["base"], "hate": zoo["hate"], "merged": merged_dir, "data": data}


def _digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("defect", list(DEFECTS))
@pytest.mark.parametrize("reader", list(STOCK_READERS) + list(MERGED_READERS))
def test_every_reader_refuses_every_broken_folder(
    reader: str, defect: str, env: dict[str, Path], tmp_path: Path
) -> None:
    source = env["merged"] if reader in MERGED_READERS else env["base" if "base" in reader else "hate"]
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    DEFECTS[defect](bad)
    before = _digest(bad)
    run = {**STOCK_READERS, **MERGED_READERS}[reader]
    with pytest.raises(GuardmergeError):
        run(bad, {**env, "tmp": tmp_path})
    assert _digest(bad) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists() and not (tmp_path / "onnx").exists()
    assert "modeling_evil" not in sys.modules


@pytest.mark.parametrize("reader", list(STOCK_READERS) + list(MERGED_READERS))
def test_every_reader_reads_the_unbroken_folder(reader: str, env: dict[str, Path], tmp_path: Path) -> None:
    """The control: each reader above succeeds on the same folder unbroken, so its refusals are
    the defects'."""
    source = env["merged"] if reader in MERGED_READERS else env["base" if "base" in reader else "hate"]
    good = tmp_path / "good"
    shutil.copytree(source, good)
    {**STOCK_READERS, **MERGED_READERS}[reader](good, {**env, "tmp": tmp_path})


def test_every_checkpoint_opener_refuses_pickle(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from guardmerge.config import StatsConfig
    from guardmerge.data import Examples
    from guardmerge.finetune import finetune
    from guardmerge.merge.align import FeatureCache
    from guardmerge.merge.statistics import compute_stats
    from guardmerge.models.multihead import MultiHeadModel

    expert = pickle_only(zoo["hate"], tmp_path / "pickled")
    base = pickle_only(zoo["base"], tmp_path / "pickled-base")
    with pytest.raises(CheckpointError, match="pickle"):
        compute_stats(expert, TEXTS, {"gram"}, StatsConfig(), progress=False)
    with pytest.raises(CheckpointError, match="pickle"):
        FeatureCache().get(expert, "hate", TEXTS, 32, 8)
    with pytest.raises(CheckpointError, match="pickle"):
        MultiHeadModel.from_classifier(expert, "hate")
    with pytest.raises(CheckpointError, match="pickle"):
        finetune(base, Examples(list(TEXTS), [0, 1] * 4), ["a", "b"], tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()
    assert FeatureCache(allow_pickle=True).get(expert, "hate", TEXTS, 32, 8).logits.shape == (len(TEXTS), 2)
