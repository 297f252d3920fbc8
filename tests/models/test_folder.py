"""Model folders: save/load round trip, a stock classifier read as a one-head model, and what a merged
folder may not hold."""

from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.errors import CheckpointError, GuardmergeError
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import TEXTS, copy_expert, edit_config, edit_weights, expert_logits


def test_save_load_round_trip_keeps_heads_labels_and_logits(merged: MultiHeadModel, tmp_path: Path) -> None:
    merged.save_pretrained(tmp_path / "m")
    loaded = guardmerge.load(tmp_path / "m")
    assert loaded.tasks == merged.tasks
    for t in merged.tasks:
        assert loaded.labels(t) == merged.labels(t)
    a, b = merged.logits(TEXTS), loaded.logits(TEXTS)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_loading_a_plain_classifier_folder_explains(zoo: dict[str, Path]) -> None:
    with pytest.raises(GuardmergeError, match="not a merged multi-head model"):
        MultiHeadModel.from_pretrained(zoo["hate"])
    one = MultiHeadModel.from_classifier(zoo["hate"], "hate")
    assert torch.allclose(one.logits(TEXTS)["hate"], expert_logits(zoo["hate"]), atol=1e-6)


# -- issue 21: what a merged folder may hold -----------------------------------------------------------


def _edit_folder(folder: Path, tensors=None, config=None) -> None:  # type: ignore[no-untyped-def]
    import json

    from safetensors.torch import load_file, save_file

    if tensors is not None:
        state = load_file(str(folder / "model.safetensors"))
        tensors(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("tensors", "config", "problem"),
    [
        (
            lambda s: s.__setitem__("heads.hate.classifier.weight", s["heads.hate.classifier.weight"].to(torch.int8)),
            None,
            "quantised",
        ),
        (
            lambda s: s.__setitem__("heads.hate.classifier.bias", s["heads.hate.classifier.bias"] > 0),
            None,
            "floating point",
        ),
        (
            lambda s: s.__setitem__(
                "encoder.layer.0.output.dense.weight", s["encoder.layer.0.output.dense.weight"].to(torch.float8_e4m3fn)
            ),
            None,
            "quantised",
        ),
        (None, lambda c: c.__setitem__("quantization_config", {"quant_method": "bitsandbytes"}), "quantised"),
        (None, lambda c: c.__setitem__("num_hidden_layers", 20000), "num_hidden_layers is 20000"),
        (
            None,
            lambda c: c["guardmerge"]["heads"].__setitem__("hate\n", c["guardmerge"]["heads"].pop("hate")),
            "not a valid task name",
        ),
        (None, lambda c: c.__setitem__("auto_map", {"AutoModel": "evil.Model"}), "auto_map"),
    ],
)
def test_load_refuses_what_a_merged_folder_may_not_hold(
    merged: MultiHeadModel,
    tmp_path: Path,
    tensors,
    config,
    problem: str,  # type: ignore[no-untyped-def]
) -> None:
    import time

    from guardmerge.errors import CheckpointError

    folder = merged.save_pretrained(tmp_path / "m")
    _edit_folder(folder, tensors, config)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=problem):
        guardmerge.load(folder)
    assert time.perf_counter() - started < 10  # refused before building 20,000 layers


def test_load_refuses_nonfinite_weights(tmp_path: Path, merged_folder: Path) -> None:
    import guardmerge

    bad = copy_expert(merged_folder, tmp_path / "bad")
    edit_weights(bad, lambda s: s["heads.hate.classifier.bias"].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=r"heads.hate.classifier.bias.*NaN or Inf"):
        guardmerge.load(str(bad))


def test_load_checks_config_against_shapes_before_allocating(tmp_path: Path, merged_folder: Path) -> None:
    import resource

    import guardmerge

    bad = copy_expert(merged_folder, tmp_path / "bad")
    edit_config(bad, vocab_size=8_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"word_embeddings.*stored as \[.*config implies \[8000000"):
        guardmerge.load(str(bad))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000  # the 8M-token embedding (512 MB at 16 dims) was never allocated


# -- issue 24: the fast load path (no random initialisation) ------------------------------------------


def test_fast_load_equals_the_slow_path_with_random_initialisation(merged_folder: Path) -> None:
    """``guardmerge.load`` builds the encoder without initialising it; transformers' own path
    (random initialisation, then the folder's tensors replace it) gives the same hidden states."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    fast = guardmerge.load(str(merged_folder))
    torch.manual_seed(0)
    slow = AutoModel.from_config(AutoConfig.from_pretrained(merged_folder)).eval()  # randomly initialised
    state = load_file(str(merged_folder / "model.safetensors"))
    missing, unexpected = slow.load_state_dict({k: v for k, v in state.items() if not k.startswith("heads.")}, False)
    assert not [m for m in missing if "position_ids" not in m] and not unexpected
    batch = fast.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ours = fast.encoder(**batch).last_hidden_state
        theirs = slow(**batch).last_hidden_state
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("edit", ["missing", "misnamed"])
def test_fast_load_refuses_a_missing_or_misnamed_encoder_tensor(tmp_path: Path, merged_folder: Path, edit: str) -> None:
    """A tensor the encoder needs and the folder lacks would keep uninitialised memory on the fast
    path: it is refused, naming the tensor, never filled at random."""
    bad = copy_expert(merged_folder, tmp_path / "bad")
    name = "encoder.layer.0.attention.self.query.weight"

    def change(state: dict[str, torch.Tensor]) -> None:
        tensor = state.pop(name)
        if edit == "misnamed":
            state["encoder.layer.0.attention.self.querry.weight"] = tensor

    edit_weights(bad, change)
    with pytest.raises(CheckpointError, match=r"query\.weight"):
        guardmerge.load(str(bad))
