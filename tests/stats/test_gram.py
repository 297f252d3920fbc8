"""Gram collection: exact values, q/k/v sharing, padding masking, canonical keys, head flags."""

from __future__ import annotations

import pytest
import torch

from guardmerge.errors import StatisticsError
from guardmerge.stats.gram import collect_grams
from tests.stats.conftest import make_batch, tiny_model

QKV = {
    "bert": (
        "encoder.layer.{i}.attention.self.query.weight",
        "encoder.layer.{i}.attention.self.key.weight",
        "encoder.layer.{i}.attention.self.value.weight",
    ),
    "roberta": (
        "encoder.layer.{i}.attention.self.query.weight",
        "encoder.layer.{i}.attention.self.key.weight",
        "encoder.layer.{i}.attention.self.value.weight",
    ),
    "distilbert": (
        "transformer.layer.{i}.attention.q_lin.weight",
        "transformer.layer.{i}.attention.k_lin.weight",
        "transformer.layer.{i}.attention.v_lin.weight",
    ),
}
HEADS = {
    "bert": {"classifier.weight"},
    "roberta": {"classifier.dense.weight", "classifier.out_proj.weight"},
    "distilbert": {"pre_classifier.weight", "classifier.weight"},
}
PAD = {"bert": 0, "roberta": 1, "distilbert": 0}


def _batches(kind: str) -> list[dict[str, torch.Tensor]]:
    return [make_batch([7, 4, 9], seed=1, pad_id=PAD[kind]), make_batch([5, 5], seed=2, pad_id=PAD[kind])]


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_qkv_share_one_gram_keyed_by_canonical_names(kind: str) -> None:
    model = tiny_model(kind)
    stats = collect_grams(model, _batches(kind), progress=False)
    for i in range(2):
        q, k, v = (name.format(i=i) for name in QKV[kind])
        assert stats.weight_to_gram[q] == q
        assert stats.weight_to_gram[k] == q and stats.weight_to_gram[v] == q
        assert k not in stats.grams and v not in stats.grams
        assert stats.gram(k) is stats.gram(q)
    # 2 layers x (qkv, attention output, intermediate, output) + the head layers (+ BERT pooler)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(stats.weight_to_gram) == n_linear
    assert len(stats.grams) == n_linear - 2 * 2
    assert stats.head == HEADS[kind]
    assert not any(name.startswith(f"{kind}.") for name in stats.weight_to_gram)


def _captured_rows(model: torch.nn.Module, batches, module: torch.nn.Module, masked: bool):
    """Inputs of ``module`` over ``batches``, as rows, captured independently of guardmerge."""
    rows = []

    def hook(mod, args):
        x = args[0].detach().double()
        if x.dim() == 3 and masked:
            rows.append(x[mask.bool()])
        else:
            rows.append(x.reshape(-1, x.shape[-1]))

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                mask = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=mask, token_type_ids=b["token_type_ids"])
    finally:
        handle.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("include_padding", [False, True])
def test_gram_is_mean_outer_product_of_inputs(include_padding: bool) -> None:
    model = tiny_model("bert")
    batches = _batches("bert")
    stats = collect_grams(model, batches, include_padding=include_padding, progress=False)
    bert = model.bert
    for name, module in [
        ("encoder.layer.0.attention.self.query.weight", bert.encoder.layer[0].attention.self.query),
        ("encoder.layer.1.output.dense.weight", bert.encoder.layer[1].output.dense),
        ("pooler.dense.weight", bert.pooler.dense),
        ("classifier.weight", model.classifier),
    ]:
        x = _captured_rows(model, batches, module, masked=not include_padding)
        expected = x.T @ x / x.shape[0]
        assert stats.grams[name].dtype == torch.float64
        torch.testing.assert_close(stats.grams[name], expected, rtol=1e-5, atol=1e-6)
        assert stats.tokens[name] == x.shape[0]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].numel()) for b in batches)
    assert stats.n_tokens == (padded if include_padding else real)
    assert stats.n_examples == 5
    assert stats.tokens["pooler.dense.weight"] == 5  # one pooled row per example


def test_wide_inputs_use_blockwise_upper_triangle_exactly() -> None:
    model = tiny_model("bert")
    batches = _batches("bert")
    full = collect_grams(model, batches, progress=False, block_size=10_000)
    blocked = collect_grams(model, batches, progress=False, block_size=5)
    for key, g in full.grams.items():
        torch.testing.assert_close(blocked.grams[key], g, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, g.T)


def test_masking_changes_nothing_without_padding() -> None:
    model = tiny_model("bert")
    batches = [make_batch([6, 6, 6], seed=3)]
    masked = collect_grams(model, batches, progress=False)
    parity = collect_grams(model, batches, include_padding=True, progress=False)
    assert masked.n_tokens == parity.n_tokens == 18
    for key, g in masked.grams.items():
        torch.testing.assert_close(parity.grams[key], g, rtol=0, atol=0)


def test_masked_padded_batch_equals_unpadded_examples_and_parity_differs() -> None:
    model = tiny_model("bert")
    lengths = [8, 3, 5]
    padded = make_batch(lengths, seed=4)
    masked = collect_grams(model, [padded], progress=False)
    parity = collect_grams(model, [padded], include_padding=True, progress=False)
    # the same examples one at a time, no padding at all
    singles = [
        {k: v[i : i + 1, :n] if v.dim() == 2 else v[i : i + 1] for k, v in padded.items()}
        for i, n in enumerate(lengths)
    ]
    unpadded = collect_grams(model, singles, progress=False)
    assert masked.n_tokens == unpadded.n_tokens == sum(lengths)
    for key, g in masked.grams.items():
        torch.testing.assert_close(g, unpadded.grams[key], rtol=1e-4, atol=1e-5)
    layer = "encoder.layer.1.output.dense.weight"
    assert not torch.allclose(parity.grams[layer], masked.grams[layer], rtol=1e-3, atol=1e-4)


def test_head_can_be_left_out_and_model_state_is_restored() -> None:
    model = tiny_model("bert")
    model.train()
    stats = collect_grams(model, _batches("bert"), include_head=False, progress=False, max_length=32)
    assert "classifier.weight" not in stats and stats.head == frozenset()
    assert "pooler.dense.weight" in stats
    assert stats.max_length == 32
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_no_batches_is_an_error() -> None:
    with pytest.raises(StatisticsError, match="zero examples"):
        collect_grams(tiny_model("bert"), [], progress=False)
