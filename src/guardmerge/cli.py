"""The ``guardmerge`` command line. Heavy modules are imported inside commands, so --help is instant."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from guardmerge.errors import GuardmergeError
from guardmerge.serve.options import serve_options

app = typer.Typer(
    name="guardmerge",
    help=(
        "Merge fine-tuned transformer classifiers (BERT, RoBERTa, XLM-R, DistilBERT, DeBERTa-v3, ModernBERT, "
        "ELECTRA, MPNet, ALBERT), training-free, "
        "into one multi-head model: one encoder pass answers every guard task.\n\n"
        "Start with `guardmerge demo`, list methods with `guardmerge methods`, merge with "
        "`guardmerge merge CONFIG OUT`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("guardmerge")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # read by transformers when (and only if) a command imports it: start-up stays fast
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="Merge config YAML (base_model, experts, method, parameters, heads).")],
    out: Annotated[Path, typer.Argument(help="Output folder (written atomically).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config key, e.g. -s parameters.scaling=0.7 -s method=ties."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept pytorch_model.bin (pickle) checkpoints you trust.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    out_shard_size: Annotated[
        str | None,
        typer.Option("--out-shard-size", help="Split the weights into shards of at most this size (e.g. 2GB)."),
    ] = None,
) -> None:
    """Merge the experts of CONFIG into one multi-head model folder OUT.

    OUT gets model.safetensors (or shards with an index, --out-shard-size), config.json (heads
    and label names), the tokenizer, merge_config.yaml and a model card. Tensors are written as
    they are merged (never the whole model in memory) unless head alignment needs the model.
    Set dtype / out_dtype in the config (float32, float16, bfloat16). OUT is refused if it
    exists, unless --force.
    """
    from guardmerge.config import load_config
    from guardmerge.io.writer import parse_size
    from guardmerge.merge.allocator import tune_for_streaming
    from guardmerge.merge.job import MergeJob
    from guardmerge.merge.stages import merge_to_folder

    overrides = list(set_ or [])
    if allow_pickle:
        overrides.append("allow_pickle=true")
    shard = parse_size(out_shard_size) if out_shard_size else None
    job = MergeJob.of(load_config(config, overrides))
    tune_for_streaming()
    merge_to_folder(job, out, force=force, progress=progress, max_shard_bytes=shard, inputs=[config])
    typer.echo(f"merged {len(job.experts)} experts with {job.config.method} -> {out}")


@app.command("self-merge")
def self_merge(
    base: Annotated[str, typer.Argument(help="The expert's base checkpoint (folder or hub id).")],
    expert: Annotated[str, typer.Argument(help="The fine-tuned classifier.")],
    out: Annotated[Path, typer.Argument(help="Output folder: a stock transformers classifier.")],
    method: Annotated[str, typer.Option(help="Any data-free method (ties, dare_ties, breadcrumbs, pcb...).")] = "ties",
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Method parameter, e.g. -s density=0.5 -s scaling=1.0.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for DARE.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """HM3 self-merging: merge one expert with itself against its base (theta_0 + scaling *
    sparsify(tau)) and write a normal single-head classifier, to study task-vector density."""
    from guardmerge.config import parse_assignments
    from guardmerge.io import check_output
    from guardmerge.merge.engine import merge as run_merge
    from guardmerge.merge.job import MergeJob
    from guardmerge.merge.stages import self_merge_config

    check_output(out, force=force, inputs=[base, expert])
    params = parse_assignments(list(set_ or []))
    cfg = self_merge_config(base, expert, method, params, task=Path(expert).name or "task", seed=seed)
    model = run_merge(MergeJob.of(cfg)).to_model()
    model.export_task(model.tasks[0], out, force=force)
    typer.echo(f"self-merged {expert} with {method} {params or ''} -> {out}")


@app.command()
def stats(
    expert: Annotated[str, typer.Argument(help="The expert classifier (folder or hub id).")],
    data: Annotated[Path, typer.Option("--data", help="Its unlabelled inputs: JSONL, CSV or TXT (or a task folder).")],
    out: Annotated[Path, typer.Option("--out", help="Statistics file to write (.safetensors).")],
    kind: Annotated[list[str], typer.Option("--kind", "-k", help="gram (RegMean) and/or fisher.")] = ["gram"],  # noqa: B006
    text_field: Annotated[str, typer.Option(help="Text field in JSONL/CSV.")] = "text",
    label_field: Annotated[str, typer.Option(help="Gold label field (empirical Fisher only).")] = "label",
    max_examples: Annotated[int, typer.Option(help="Use at most this many texts.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 32,
    max_length: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    include_padding: Annotated[bool, typer.Option(help="Include padding tokens in Grams (reference parity).")] = False,
    fisher_labels: Annotated[str, typer.Option(help="Fisher labels: hard, soft or empirical.")] = "hard",
    fisher_gradient: Annotated[str, typer.Option(help="per_example, or batch (reference parity).")] = "per_example",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept a pytorch_model.bin (pickle) expert you trust.")
    ] = False,
) -> None:
    """Compute an expert's statistics once (RegMean Grams, diagonal Fisher) and store them,
    tied to the expert by fingerprint, so merges need no data: `stats: FILE` in the config."""
    from guardmerge.config import StatsConfig
    from guardmerge.io import check_output
    from guardmerge.merge.statistics import write_expert_stats

    check_output(out, force=force, inputs=[expert, data], file=True)
    settings = StatsConfig(
        examples=max_examples,
        batch_size=batch_size,
        max_length=max_length,
        include_padding=include_padding,
        fisher_labels=fisher_labels,
        fisher_gradient=fisher_gradient,
    )
    count = write_expert_stats(
        expert,
        data,
        out,
        set(kind),
        settings,
        text_field=text_field,
        label_field=label_field,
        force=force,
        allow_pickle=allow_pickle,
    )
    typer.echo(f"{'+'.join(sorted(kind))} statistics of {expert} on {count} texts -> {out}")


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
def methods(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the registered merge methods and their parameters."""
    from guardmerge.docs import methods_json, methods_text

    typer.echo(json.dumps(methods_json(), indent=2) if as_json else methods_text())


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="Merge config YAML: experts, method, fixed parameters.")],
    data: Annotated[Path, typer.Option("--data", help="Folder with one sub-folder per task holding validation.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the best merge (written atomically).")],
    trials: Annotated[int, typer.Option(help="Finished trials (complete or pruned) the study ends with.")] = 100,
    sampler: Annotated[str, typer.Option(help="tpe, cmaes (PCB + ES) or random.")] = "tpe",
    params: Annotated[
        str | None,
        typer.Option(
            "--params",
            help="Comma-separated parameters to search (default: all the method "
            "declares; 'none' to search only --weights).",
        ),
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="Also search per-expert weights in LOW,HIGH (e.g. 0.5,3.0).")
    ] = None,
    objective: Annotated[
        str, typer.Option(help="mean, worst (the worst task's) or weighted validation macro-F1.")
    ] = "mean",
    task_weight: Annotated[
        list[str] | None, typer.Option("--task-weight", help="TASK=W for --objective weighted (others weigh 1).")
    ] = None,
    val_limit: Annotated[int, typer.Option(help="Validation examples per task (first n); 0 = all.")] = 200,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default: sqlite file OUT.search/study.db).")
    ] = None,
    study_name: Annotated[str, typer.Option(help="Study name in the storage.")] = "guardmerge",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted study.")] = False,
    workers: Annotated[int, typer.Option(help="Parallel workers (processes, or Ray tasks with --ray).")] = 1,
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run workers on a Ray cluster at ADDRESS ('local' starts one).")
    ] = None,
    prune: Annotated[
        bool, typer.Option(help="Prune hopeless trials (median rule, once half the tasks are scored).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Search a method's parameters (and optionally per-expert weights) on validation data.

    The ranges come from the method's schema (see `guardmerge methods`). Trials persist in a
    database (SQLite by default, in OUT.search/), so --resume continues an interrupted search;
    --workers K runs K processes on one study, --ray ADDRESS runs them on a Ray cluster. The
    best merge is written to OUT as a normal merged model, with search.json (every trial,
    seconds per trial), search_history.png and a model card naming the search.
    Needs pip install 'guardmerge\\[search]'.
    """
    from guardmerge.config import load_config
    from guardmerge.search import SearchSettings
    from guardmerge.search import run as searching

    settings = SearchSettings(
        trials=trials,
        sampler=sampler,  # type: ignore[arg-type]  # checked by the study
        seed=seed,
        study_name=study_name,
        resume=resume,
        workers=workers,
        ray_address=ray,
        prune=prune,
        objective=objective,  # type: ignore[arg-type]  # checked by search_to_folder
        task_weights=searching.parse_task_weights(task_weight or []),
    )
    result = searching.search_to_folder(
        load_config(config, list(set_ or [])),
        data,
        out,
        settings,
        only=searching.parse_param_list(params),
        weight_range=searching.parse_weight_range(weights),
        val_limit=val_limit or None,
        storage=storage,
        force=force,
        progress=progress,
        inputs=[config],
    )
    typer.echo(f"{searching.summary_line(result)} -> {out}")


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="A merged model folder.")],
    task: Annotated[str, typer.Argument(help="The head to export.")],
    out: Annotated[
        Path,
        typer.Argument(
            help="Output folder: a stock AutoModelForSequenceClassification (AutoModelForTokenClassification for a "
            "token head)."
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Export one task of a merged model as a stock transformers classifier folder (a multi-label
    head with problem_type multi_label_classification; a token head as the family's token classifier)."""
    from guardmerge.io import check_output
    from guardmerge.models.multihead import MultiHeadModel

    check_output(out, force=force, inputs=[model])
    MultiHeadModel.from_pretrained(model).export_task(task, out, force=force)
    typer.echo(f"exported '{task}' -> {out}")


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


@app.command()
@serve_options
def serve(
    model: Annotated[
        Path, typer.Argument(help="A merged model folder, or (with --backend onnx) a folder from export-onnx.")
    ],
    **flags: Any,
) -> None:
    """Serve MODEL over HTTP: POST /v1/classify, GET /v1/model, /healthz, /metrics (Prometheus);
    the OpenAPI document is at /openapi.json. Needs the extra named serve.

    Single-label heads answer a label, its score and every label's probability; multi-label heads
    every label's sigmoid probability and the labels at or above their thresholds; token heads
    their entity spans (type, character offsets, text, score). A text is flagged when any head
    flags it: a non-benign label at or above its threshold, or (token heads) an entity of a
    flagged type."""
    from guardmerge.serve.process import run_serve

    run_serve(model, flags)


@app.command("export-onnx")
def export_onnx_(
    model: Annotated[Path, typer.Argument(help="A merged model folder.")],
    out: Annotated[Path, typer.Argument(help="Output folder: model.onnx, tokenizer, guardmerge_onnx.json.")],
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 quantisation of the weights.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Export MODEL as one ONNX graph (all heads' logits as outputs logits_<task>, dynamic batch and
    sequence axes), self-contained with its tokenizer; serve it with `guardmerge serve OUT --backend onnx`."""
    from guardmerge.export.onnx import export_onnx
    from guardmerge.io import check_output

    check_output(out, force=force, inputs=[model])
    import guardmerge

    export_onnx(guardmerge.load(str(model)), out, quantize=quantize, force=force)
    typer.echo(f"exported {model} to ONNX ({quantize or 'fp32'}) -> {out}")


# Commands whose work is complete (files closed and renamed into place) when they return: after
# success the process exits at once, skipping the interpreter's teardown (about 0.4 s spent
# freeing torch's modules, a tenth of a small merge).
_FAST_EXIT_COMMANDS = frozenset({"merge", "self-merge"})


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _one_line(text: str, limit: int = 2000) -> str:
    """An error message on one line, of bounded length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def main() -> None:
    """Console entry point: clean one-line errors for bad input, exit code 2."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    try:
        app()
    except SystemExit as exc:
        if command in _FAST_EXIT_COMMANDS and exc.code in (None, 0):
            _exit_now()
        raise
    except GuardmergeError as exc:
        _close_progress_bars()
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        raise SystemExit(2) from None
    except OSError as exc:  # a path the system refuses (too long, permissions, disk full) is a user error
        _close_progress_bars()
        where = f"{_one_line(str(exc.filename))[:200]}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
