"""Diagonal Fisher: per-example gradients (vmap) match a loop over single examples."""

from __future__ import annotations

import pytest
import torch

from guardmerge.errors import ConfigError, DataError
from guardmerge.stats.fisher import collect_fisher
from tests.stats.conftest import make_batch, tiny_model


def _loop_fisher(model, batches, label_mode: str) -> dict[str, torch.Tensor]:
    """Reference: one example at a time, plain autograd, E_y over the label mode."""
    model.eval()
    params = list(model.named_parameters())
    total: dict[str, torch.Tensor] = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    count = 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            logits = model(
                input_ids=b["input_ids"][i : i + 1, :n],
                attention_mask=b["attention_mask"][i : i + 1, :n],
                token_type_ids=b["token_type_ids"][i : i + 1, :n],
            ).logits[0]
            logp = torch.log_softmax(logits, dim=-1)
            if label_mode == "hard":
                targets = [(int(logp.argmax()), 1.0)]
            elif label_mode == "empirical":
                targets = [(int(b["labels"][i]), 1.0)]
            else:
                targets = [(c, float(logp[c].detach().exp())) for c in range(logp.shape[0])]
            for y, w in targets:
                grads = torch.autograd.grad(logp[y], [p for _, p in params], retain_graph=True)
                for (name, _), g in zip(params, grads):
                    total[name] += w * g.double() ** 2
            count += 1
    return {name: t / count for name, t in total.items()}


@pytest.mark.parametrize("label_mode", ["hard", "soft", "empirical"])
def test_per_example_fisher_matches_single_example_loop(label_mode: str) -> None:
    model = tiny_model("bert", num_labels=3)
    batches = [make_batch([6, 3, 5], seed=1), make_batch([4, 4], seed=2)]
    stats = collect_fisher(model, batches, label_mode=label_mode, micro_batch_size=2, progress=False)
    reference = _loop_fisher(model, batches, label_mode)
    assert stats.n_examples == 5 and stats.label_mode == label_mode
    assert stats.gradient == "per_example"
    assert set(stats.fisher) == {n.removeprefix("bert.") for n in reference}
    for name, ref in reference.items():
        got = stats.fisher[name.removeprefix("bert.")]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_micro_batch_size_does_not_change_the_result() -> None:
    model = tiny_model("distilbert", num_labels=2)
    batch = make_batch([5, 2, 4, 3], seed=5, num_labels=2)
    batch.pop("token_type_ids")
    one = collect_fisher(model, [batch], micro_batch_size=1, progress=False)
    four = collect_fisher(model, [batch], micro_batch_size=4, progress=False)
    assert "transformer.layer.0.attention.q_lin.weight" in one.fisher
    assert one.head == {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
    for name, f in one.fisher.items():
        torch.testing.assert_close(four.fisher[name], f, rtol=1e-5, atol=1e-8)


def test_batch_mode_squares_the_batch_gradient() -> None:
    model = tiny_model("bert", num_labels=2)
    batches = [make_batch([5, 3], seed=6, num_labels=2), make_batch([4, 4, 2], seed=7, num_labels=2)]
    stats = collect_fisher(model, batches, gradient="batch", label_mode="empirical", progress=False)
    expected: dict[str, torch.Tensor] = {}
    for b in batches:
        logp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, dim=-1)
        objective = logp.gather(1, b["labels"].unsqueeze(1)).mean()
        grads = torch.autograd.grad(objective, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            expected[name] = expected.get(name, 0) + g.double() ** 2 / len(batches)
    assert stats.gradient == "batch" and stats.n_examples == 5
    for name, ref in expected.items():
        torch.testing.assert_close(stats.fisher[name.removeprefix("bert.")].double(), ref, rtol=1e-4, atol=1e-7)


def test_head_left_out_and_bad_options_refused() -> None:
    model = tiny_model("bert", num_labels=2)
    batch = make_batch([3, 2], seed=8, num_labels=2)
    stats = collect_fisher(model, [batch], include_head=False, progress=False)
    assert "classifier.weight" not in stats and stats.head == frozenset()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(DataError, match="labels"):
        collect_fisher(model, [no_labels], label_mode="empirical", progress=False)
    with pytest.raises(ConfigError, match="soft"):
        collect_fisher(model, [batch], label_mode="soft", gradient="batch", progress=False)
    with pytest.raises(ConfigError, match="label mode"):
        collect_fisher(model, [batch], label_mode="argmax", progress=False)  # type: ignore[arg-type]


def test_word_embedding_rows_with_repeated_tokens_are_exact() -> None:
    """Per-example embedding gradients sum repeated tokens before squaring (not after)."""
    model = tiny_model("roberta", num_labels=2)
    ids = torch.tensor([[0, 5, 5, 7, 5, 2], [0, 7, 9, 7, 2, 1]])  # 1 = RoBERTa's padding id
    mask = (ids != 1).long()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    stats = collect_fisher(model, [batch], label_mode="soft", progress=False)
    reference = _loop_fisher(model, [batch], "soft")
    name = "roberta.embeddings.word_embeddings.weight"
    got = stats.fisher[name.removeprefix("roberta.")]
    assert got[5].abs().sum() > 0 and got[7].abs().sum() > 0
    torch.testing.assert_close(got.double(), reference[name], rtol=1e-4, atol=1e-7)
    assert got[3].abs().sum() == 0  # a token seen nowhere has zero Fisher
