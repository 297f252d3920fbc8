"""Write a tiny random BERT base, two experts fine-tuned "from" it (base + a random task vector,
random heads) and a merge config into DIR, for the CI smoke test of the installed wheel.

    python .ci/tiny_models.py DIR   ->  DIR/base, DIR/hate, DIR/injection, DIR/merge.yaml
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

WORDS = [
    "the",
    "a",
    "is",
    "not",
    "you",
    "i",
    "it",
    "this",
    "ignore",
    "previous",
    "instructions",
    "hate",
    "love",
    "happy",
    "sad",
    "good",
    "bad",
]


def tokenizer(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        BertTokenizerFast(str(vocab), do_lower_case=True).save_pretrained(str(folder))


def main(root: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    base = BertModel(config)
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    tokenizer(root / "base")
    for seed, (task, labels) in enumerate({"hate": ["not-hate", "hate"], "injection": ["benign", "injection"]}.items()):
        torch.manual_seed(seed + 1)
        cfg = BertConfig(**config.to_dict())
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {n: i for i, n in enumerate(labels)}
        expert = BertForSequenceClassification(cfg)
        expert.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.bert.parameters():
                p.add_(0.004 * torch.randn_like(p))
        expert.save_pretrained(str(root / task), safe_serialization=True)
        tokenizer(root / task)
    (root / "merge.yaml").write_text(
        yaml.safe_dump(
            {
                "base_model": str(root / "base"),
                "experts": [{"model": str(root / t), "task": t} for t in ("hate", "injection")],
                "method": "ties",
                "parameters": {"density": 0.5, "scaling": 1.0},
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
