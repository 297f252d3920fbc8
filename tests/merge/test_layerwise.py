"""The layer-wise stage on tiny random BERTs: lot and regmean_pp end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import ConfigError
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build, merge_to_folder
from guardmerge.merge.statistics import compute_stats
from tests.builders import TEXTS, WORDS, expert_logits, make_base, make_expert


@pytest.fixture(scope="module")
def lw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, two experts, and 60 unlabelled texts."""
    root = tmp_path_factory.mktemp("layerwise")
    base = make_base(root / "base")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(60)]
    data = root / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return {
        "base": base,
        "data": data,
        "a": make_expert(root / "a", base, ["no", "yes"], seed=1),
        "b": make_expert(root / "b", base, ["x", "y", "z"], seed=2),
    }


def _config(lw: dict[str, Path], method: str, experts: list[tuple[str, Path]], **params: object):
    return parse_config(
        {
            "base_model": str(lw["base"]),
            "experts": [{"model": str(p), "task": t, "data": str(lw["data"])} for t, p in experts],
            "method": method,
            "parameters": dict(params),
            "align_heads": False,
        }
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("lot", {}),
        ("regmean_pp", {}),
        ("wudi", {"rho": 0.0, "anchor_scaling": 1.0}),
        ("prodistill", {"init_scaling": 1.0, "epochs": 3}),
    ],
)
def test_one_expert_is_returned(lw: dict[str, Path], method: str, params: dict) -> None:
    """Every new method (wudi at its exact objective and lambda 1) returns a single expert."""
    model = build(MergeJob.of(_config(lw, method, [("a", lw["a"])], **params)), progress=False).to_model()
    torch.testing.assert_close(model.logits(TEXTS)["a"], expert_logits(lw["a"]), atol=1e-5, rtol=0)


def test_lot_identical_experts_are_returned(lw: dict[str, Path]) -> None:
    model = build(MergeJob.of(_config(lw, "lot", [("a1", lw["a"]), ("a2", lw["a"])])), progress=False).to_model()
    want = expert_logits(lw["a"])
    logits = model.logits(TEXTS)
    for task in ("a1", "a2"):
        torch.testing.assert_close(logits[task], want, atol=1e-5, rtol=0)


def test_every_linear_layer_is_solved_the_rest_kept(lw: dict[str, Path]) -> None:
    """Every encoder Linear (and the pooler) moves off the anchor; embeddings are the experts'
    average and LayerNorm too (``norms: average``) or the anchor's (``norms: anchor``)."""
    experts = [("a", lw["a"]), ("b", lw["b"])]
    anchor = build(MergeJob.of(_config(lw, "task_arithmetic", experts)), progress=False).tensors
    average = build(MergeJob.of(_config(lw, "average", experts)), progress=False).tensors
    solved = build(MergeJob.of(_config(lw, "lot", experts)), progress=False)
    assert solved.info["layerwise"]["layers"] == 2 * 6 + 1  # q, k, v, attn out, intermediate, output; pooler
    normed = build(MergeJob.of(_config(lw, "lot", experts, norms="anchor")), progress=False).tensors
    for name, t in solved.tensors.items():
        if name.startswith("heads."):
            continue
        assert torch.isfinite(t).all()
        if "LayerNorm" in name:
            torch.testing.assert_close(t, average[name])
            torch.testing.assert_close(normed[name], anchor[name])
        elif "embeddings" in name:
            torch.testing.assert_close(t, average[name])
        else:  # Linear weights and biases
            assert float((t - anchor[name]).abs().max()) > 1e-6, name


def test_regmean_pp_first_layer_equals_regmean(lw: dict[str, Path], tmp_path: Path) -> None:
    """Experts that differ from the base only above the embeddings give every model the same
    first-layer inputs, so RegMean++'s first block equals RegMean's (Grams on the same texts)."""
    from safetensors.torch import load_file, save_file

    experts = []
    base_tensors = load_file(str(lw["base"] / "model.safetensors"))
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for f in lw[name].iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        tensors = load_file(str(folder / "model.safetensors"))
        for key in tensors:
            if ".embeddings." in key:
                tensors[key] = base_tensors[key.removeprefix("bert.")].clone()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        experts.append((name, folder))
    pp = build(MergeJob.of(_config(lw, "regmean_pp", experts)), progress=False).tensors
    cfg = _config(lw, "regmean", experts)
    stats = [
        compute_stats(
            p,
            [json.loads(line)["text"] for line in lw["data"].read_text().splitlines()][:300],
            {"gram"},
            cfg.statistics,
            progress=False,
        )
        for _, p in experts
    ]
    rm = build(MergeJob.of(cfg), stats=stats, progress=False).tensors
    for key in ("query", "key", "value"):
        name = f"encoder.layer.0.attention.self.{key}.weight"
        # LayerNorm outputs span a subspace (their features sum to a constant): compare the two
        # solutions where inputs exist, i.e. through the Gram (off it each keeps its own fallback)
        gram = sum(s.gram.gram(name).double() for s in stats)
        torch.testing.assert_close(pp[name].double() @ gram, rm[name].double() @ gram, atol=1e-5, rtol=1e-4)
    # above the first block the inputs differ: RegMean++ is not RegMean there
    top = "encoder.layer.1.output.dense.weight"
    assert float((pp[top] - rm[top]).abs().max()) > 1e-4


def test_missing_texts_fail_before_any_output_naming_the_expert(lw: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lot.*expert\(s\) b"):
        MergeJob.of(
            parse_config(
                {
                    "base_model": str(lw["base"]),
                    "experts": [
                        {"model": str(lw["a"]), "task": "a", "data": str(lw["data"])},
                        {"model": str(lw["b"]), "task": "b"},
                    ],
                    "method": "lot",
                }
            )
        )
    # texts that do not exist: refused before the output folder appears
    cfg = parse_config(
        {
            "base_model": str(lw["base"]),
            "experts": [{"model": str(lw["a"]), "task": "a", "data": str(tmp_path / "nope.jsonl")}],
            "method": "regmean_pp",
        }
    )
    from guardmerge.errors import GuardmergeError

    with pytest.raises(GuardmergeError, match="nope.jsonl"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_layerwise_then_alignment_written_and_reloaded(lw: dict[str, Path], tmp_path: Path) -> None:
    from guardmerge.models.multihead import MultiHeadModel

    cfg = parse_config(
        {**_config(lw, "lot", [("a", lw["a"]), ("b", lw["b"])], rho=1.0).model_dump(), "align_heads": {"examples": 40}}
    )
    out = merge_to_folder(MergeJob.of(cfg), tmp_path / "merged", progress=False)
    in_memory = build(MergeJob.of(cfg), progress=False).to_model().logits(TEXTS)
    loaded = MultiHeadModel.from_pretrained(out).logits(TEXTS)
    for task in ("a", "b"):
        torch.testing.assert_close(loaded[task], in_memory[task], atol=1e-5, rtol=0)
    card = json.loads((out / "config.json").read_text())["guardmerge"]
    assert card["method"] == "lot" and "layerwise" in card and "align_heads" in card
    readme = (out / "README.md").read_text()
    assert "Layer-wise solves: 13 Linear layers" in readme and "Head alignment" in readme


def test_prodistill_moves_every_block_toward_the_experts(lw: dict[str, Path]) -> None:
    """Two experts: the distilled merge's logits are closer to each expert's than its start
    (task arithmetic at init_scaling); every block and the pooler are fitted; embeddings keep
    the start; a per-tensor fit stays in the span of the task vectors."""
    experts = [("a", lw["a"]), ("b", lw["b"])]
    start = build(MergeJob.of(_config(lw, "task_arithmetic", experts, scaling=0.3)), progress=False)
    fitted = build(MergeJob.of(_config(lw, "prodistill", experts, epochs=8, texts=40)), progress=False)
    assert fitted.info["layerwise"]["layers"] == 2 + 1 and fitted.info["layerwise"]["unit"] == "blocks fitted"
    from guardmerge.models.multihead import MultiHeadModel

    def pooled(model: MultiHeadModel) -> torch.Tensor:
        return model.head_inputs(**model.encode(TEXTS))["pooled"]

    with torch.no_grad():
        ours, theirs = pooled(fitted.to_model()), pooled(start.to_model())
        wants = [pooled(MultiHeadModel.from_classifier(folder, task)) for task, folder in experts]
    gaps = [(float((ours - w).pow(2).mean()), float((theirs - w).pow(2).mean())) for w in wants]
    assert all(o < t for o, t in gaps), gaps
    assert sum(o for o, _ in gaps) < 0.85 * sum(t for _, t in gaps), gaps
    for name, t in fitted.tensors.items():
        if "embeddings" in name:
            torch.testing.assert_close(t, start.tensors[name])
    per_tensor = build(
        MergeJob.of(_config(lw, "prodistill", experts, epochs=3, texts=40, granularity="tensor")), progress=False
    )
    from safetensors.torch import load_file

    base = load_file(str(lw["base"] / "model.safetensors"))
    taus = [load_file(str(lw[x] / "model.safetensors")) for x in ("a", "b")]
    name = "encoder.layer.1.attention.self.query.weight"
    tau = torch.stack([t[f"bert.{name}"] - base[name] for t in taus]).reshape(2, -1)
    moved = (per_tensor.tensors[name] - base[name]).reshape(-1, 1)
    coef = torch.linalg.lstsq(tau.T, moved).solution
    torch.testing.assert_close(tau.T @ coef, moved, atol=1e-5, rtol=0)
    assert float((per_tensor.tensors[name] - start.tensors[name]).abs().max()) > 1e-6
