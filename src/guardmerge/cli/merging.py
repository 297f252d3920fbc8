"""Commands that build a merged model: merge, self-merge, stats, methods, search, plan, export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from guardmerge.cli import app
from guardmerge.errors import ConfigError

log = logging.getLogger("guardmerge")


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
def plan(
    config: Annotated[Path, typer.Argument(help="Merge config YAML: base, experts (with `data:` to heal), method.")],
    data: Annotated[Path, typer.Option("--data", help="Folder with one sub-folder per task holding validation.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the chosen merge (written atomically).")],
    min_agreement: Annotated[
        float, typer.Option(help="Floor on every head's agreement with its expert (own-task and off-task texts).")
    ] = 0.97,
    max_compute: Annotated[
        float | None, typer.Option(help="Most encoder compute allowed, in passes of one model (e.g. 1.5).")
    ] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods to try (default: the config's).")] = None,
    depths: Annotated[
        str | None, typer.Option(help="Comma-separated sharing depths per task (default: L, L-1, L-2).")
    ] = None,
    heal: Annotated[str, typer.Option(help="Heal choices: off, heads, top, all (comma-separated).")] = "off,top",
    trials: Annotated[int, typer.Option(help="Plans scored (each a full merge, heal when chosen).")] = 20,
    sampler: Annotated[str, typer.Option(help="tpe or random.")] = "tpe",
    val_limit: Annotated[int, typer.Option(help="Validation texts per task (first n); 0 = all.")] = 200,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: OUT.plan/study.db).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted plan.")] = False,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Find the cheapest merge whose every head agrees with its expert at least --min-agreement.

    Searches (Optuna, resumable) method, per-task sharing depth and heal on unlabelled validation
    texts, prints the frontier (compute vs lowest agreement; * chosen, p Pareto) and writes the
    chosen merge to OUT with plan.json. Compute counts encoder blocks per text over one pass.
    Needs pip install 'guardmerge\\[search]'.
    """
    from guardmerge.config import load_config
    from guardmerge.search import SearchSettings
    from guardmerge.search.plan import plan_to_folder

    def items(text: str | None) -> list[str] | None:
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    try:
        ks = [int(k) for k in items(depths) or []] or None
    except ValueError:
        raise ConfigError(f"--depths '{depths}' must be comma-separated integers") from None
    summary = plan_to_folder(
        load_config(config, list(set_ or [])),
        data,
        out,
        SearchSettings(trials=trials, sampler=sampler, seed=seed, study_name="guardmerge-plan", resume=resume),  # type: ignore[arg-type]
        min_agreement=min_agreement,
        max_compute=max_compute,
        methods=items(methods),
        depths=ks,
        heal=items(heal) or [],
        val_limit=val_limit or None,
        storage=storage,
        force=force,
        progress=progress,
        inputs=[config],
    )
    typer.echo(summary["frontier_table"])
    met = "meets" if summary["meets_floor"] else "does NOT meet"
    typer.echo(f"chosen plan {met} the floor {min_agreement} at {summary['chosen']['compute']:.3f}x one pass -> {out}")


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
