"""Commands around the experts and their heads: predict, finetune, eval, demo."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from guardmerge.cli import app
from guardmerge.errors import GuardmergeError

log = logging.getLogger("guardmerge")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A merged model folder (or a stock classifier folder).")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: one object per text.")] = False,
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help="Only these heads.")] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per encoder pass.")] = 32,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold",
            help="Threshold of a multi-label head's labels: task=0.7 (every label) or task.label=0.7.",
        ),
    ] = None,
    aggregation: Annotated[
        str, typer.Option(help="Token heads: how word pieces become entities, first or simple (as transformers).")
    ] = "first",
) -> None:
    """Print every head's answer for each TEXT: single-label heads their label and probability,
    multi-label heads the labels at or above their thresholds (--json: every label's sigmoid
    probability), token heads their entity spans (type, character offsets, text, score)."""
    from guardmerge.models.multihead import load_any
    from guardmerge.serve.flags import predict_thresholds

    m = load_any(model)
    res = m.predict(
        texts,
        batch_size=batch_size,
        tasks=task or None,
        thresholds=predict_thresholds(threshold),
        aggregation=aggregation,
    )
    tasks = list(res)
    if as_json:
        for i, text in enumerate(texts):
            typer.echo(json.dumps({"text": text, **{t: res[t][i] for t in tasks}}))
        return
    width = min(48, max(len(t) for t in texts))
    typer.echo(f"{'text':<{width}}  " + "  ".join(f"{t:<24}" for t in tasks))
    for i, text in enumerate(texts):
        short = text if len(text) <= width else text[: width - 1] + "…"
        cells = "  ".join(f"{_verdict(res[t][i]):<24}" for t in tasks)
        typer.echo(f"{short:<{width}}  {cells}")


def _verdict(item: dict | list) -> str:
    if isinstance(item, list):  # a token head's entity spans
        return "; ".join(f"{e['label']} '{e['text']}'" for e in item) or "-"
    if "labels" in item:  # a multi-label head
        return ", ".join(item["labels"]) or "-"
    return f"{item['label']} ({item['score']:.3f})"


@app.command()
def finetune(
    base: Annotated[str, typer.Argument(help="Base checkpoint folder or hub id (the shared theta_0).")],
    data: Annotated[
        Path,
        typer.Argument(
            help="Task folder (train.jsonl + labels.json, whose 'type' sets the task type) or a JSONL/CSV file."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output classifier folder.")],
    labels: Annotated[str | None, typer.Option(help="Comma-separated label names (when DATA is a file).")] = None,
    task_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="Task type when DATA is a file: single_label ({text, label}), multi_label ({text, labels: "
            "[int, ...]}, a sigmoid per label) or token ({tokens, tags}, a token classifier, IOB2 tags).",
        ),
    ] = "single_label",
    text_field: Annotated[str, typer.Option(help="Text field in JSONL/CSV.")] = "text",
    label_field: Annotated[str, typer.Option(help="Integer label field in JSONL/CSV.")] = "label",
    epochs: Annotated[float, typer.Option(help="Passes over the training data.")] = 2.0,
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    max_length: Annotated[int, typer.Option(help="Max tokens per text.")] = 64,
    max_examples: Annotated[int | None, typer.Option(help="Cap on training examples.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    head_lr: Annotated[
        float | None, typer.Option("--head-lr", help="Peak LR of the new head (default --lr; ~10x helps multi-label).")
    ] = None,
    warmup: Annotated[float, typer.Option(help="Fraction of steps warming up (then linear decay).")] = 0.1,
    pos_weight_max: Annotated[
        float, typer.Option(help="Multi-label: positives weigh sqrt(neg/pos), clipped to [1, this]; 1 = off.")
    ] = 30.0,
    tune_thresholds: Annotated[
        bool, typer.Option(help="Multi-label: per-label F1-best thresholds on validation, stored in OUT.")
    ] = True,
    validation: Annotated[
        Path | None, typer.Option(help="Validation file for thresholds (default: DATA's validation.jsonl).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept a pytorch_model.bin (pickle) base you trust.")
    ] = False,
) -> None:
    """Fine-tune an expert classifier from BASE (to add a guard to a merge): a sequence classifier,
    a multi-label one or a token classifier, as the data says.

    Multi-label data trains with positive-class weights for rare labels (--pos-weight-max) and gets
    per-label thresholds tuned on the validation split (--tune-thresholds)."""
    from guardmerge.finetune import FinetuneSettings, training_data
    from guardmerge.finetune import finetune as run
    from guardmerge.io import check_output
    from guardmerge.io.checkpoint import resolve

    check_output(out, force=force, inputs=[base, data, *([validation] if validation else [])])
    train, names, valid = training_data(data, task_type, labels, text_field, label_field, validation)
    settings = FinetuneSettings(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        max_examples=max_examples,
        seed=seed,
        head_learning_rate=head_lr,
        warmup=warmup,
        pos_weight_max=pos_weight_max,
        tune_thresholds=tune_thresholds,
    )
    run(resolve(base), train, names, out, settings, force=force, allow_pickle=allow_pickle, validation=valid)
    typer.echo(f"fine-tuned expert -> {out}")


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="A merged model folder or a stock classifier folder.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Folder of task folders (labels.json + SPLIT.jsonl).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    task: Annotated[str | None, typer.Option(help="Task name of a single-classifier MODEL.")] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many examples per task (per file).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here (refused if it exists).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    expert: Annotated[
        list[str] | None,
        typer.Option(
            "--expert", "-e", help="TASK=FOLDER: add normalised = merged / expert; with --experts, the experts to use."
        ),
    ] = None,
    experts: Annotated[
        bool,
        typer.Option(
            "--experts", help="Fidelity report, no labels: each head vs its expert (MODEL/merge_config.yaml's, or -e)."
        ),
    ] = False,
    texts: Annotated[
        list[str] | None,
        typer.Option("--texts", help="TASK=FILE: unlabelled texts (JSONL/CSV/TXT) of TASK for --experts; repeatable."),
    ] = None,
    benign: Annotated[
        list[str] | None,
        typer.Option("--benign", help="TASK=LABEL[,LABEL...]: labels that never flag, for --experts' flag rates."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per task.")] = True,
) -> None:
    """Score MODEL's heads on labelled data ({task: {metric: value}}; with --expert, the normalised
    score per task): single-label heads macro-F1, accuracy and official metrics; multi-label heads
    macro-, micro- and per-label F1 at their thresholds; token heads entity-level micro-F1, macro-F1
    over types and per-type F1 (seqeval, on word-level tags).

    With --experts, a fidelity report on unlabelled texts instead: per head, agreement with its
    expert on its task's texts and on the others', and the flag-rate difference, with 95% intervals."""
    from guardmerge.evaluate import labelled_report, to_json_ready
    from guardmerge.evaluate.fidelity import expert_folders, fidelity_report, fidelity_table, fidelity_texts

    folders = expert_folders(model, expert or []) if experts else {}
    if out is not None:
        from guardmerge.io import check_output

        given = [item.split("=", 1)[-1] for item in [*(expert or []), *(texts or [])]]
        check_output(out, force=force, inputs=[model, data, *given, *folders.values()], file=True)
    if experts:
        pool = fidelity_texts(data, texts or [], split, limit)
        res = fidelity_report(model, folders, pool, task=task, benign=benign or [], progress=progress)
        typer.echo(fidelity_table(res))
    else:
        if data is None or texts or benign:
            raise GuardmergeError("eval scores labelled --data FOLDER; --texts and --benign go with --experts")
        res, text = labelled_report(
            model, data, split=split, task=task, limit=limit, experts=expert or [], progress=progress
        )
        typer.echo(text)
    if out:
        from guardmerge.io import atomic_file

        with atomic_file(out, force=force, mode="w") as fh:
            fh.write(json.dumps(to_json_ready(res), indent=2) + "\n")


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option("--data", help="Folder of task folders (default: ../shared/data).")
    ] = None,
    work: Annotated[Path, typer.Option(help="Where experts (cached), the merged model and results go.")] = Path(
        "guardmerge-demo"
    ),
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", help="Tasks to use (default: injection, emotion, offensive).")
    ] = None,
) -> None:
    """The default example: fine-tune small experts from the real MiniLM base, merge them,
    and print each task's macro-F1 for the experts and the merged model side by side.

    Experts are cached under WORK/experts, so a second run only merges and scores.
    """
    from guardmerge.demo import render, run_demo

    summary = run_demo(work, data, task or None)
    typer.echo("")
    typer.echo(render(summary))
