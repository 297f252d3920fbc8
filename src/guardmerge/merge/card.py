"""The model card (``README.md``) written into every merged folder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardmerge.config import MergeConfig
    from guardmerge.merge.result import MergeResult


def _heal_line(heal: dict[str, Any]) -> str:
    """The heal bullet: data sizes, settings and the held-out agreement before and after."""
    s, pool = heal["settings"], heal["pool"]
    sizes = ", ".join(f"{t} {n}" for t, n in pool.get("tasks", {}).items())
    where = "held-out" if heal.get("measured_on") == "holdout" else "training"
    return (
        f"- Healed: label-free distillation from the experts, the one stage that trains weights, starting from "
        f"the training-free merge (`train: {s['train']}`, {pool['texts']} unlabelled texts pooled from {sizes}; "
        f"{pool['train']} trained on, {pool['holdout']} held out; {heal['steps']['done']} steps of "
        f"{heal['steps']['planned']}, {s['epochs']} epochs, AdamW lr {s['learning_rate']}, batch {s['batch_size']}, "
        f"temperature {s['temperature']}, seed {s['seed']}); {where} agreement with the experts "
        f"{heal['agreement_before']:.3f} before, {heal['agreement_after']:.3f} after "
        "(docs/algorithms.md 3c in the guardmerge repository)"
    )


def _stage_lines(info: dict[str, Any]) -> list[str]:
    """One bullet per data stage that ran: head alignment, layer-wise solves, sharing depth, heal."""
    lines = []
    if info.get("align_heads"):
        settings = info["align_heads"]["settings"]
        lines.append(
            f"- Head alignment: `{settings['method']}` on {settings['examples']} unlabelled texts per task "
            "(docs/algorithms.md 3b in the guardmerge repository)"
        )
    if info.get("layerwise"):
        lw = info["layerwise"]
        tokens = ", ".join(f"{t} {n}" for t, n in lw["tokens"].items())
        lines.append(
            f"- Layer-wise solves: {lw['layers']} {lw.get('unit', 'Linear layers')} solved on the merged model's own "
            f"activations ({tokens} tokens; docs/algorithms.md 3a in the guardmerge repository)"
        )
    if info.get("share_layers") is not None:
        lines.append(_sharing_line(info))
    if info.get("heal"):
        lines.append(_heal_line(info["heal"]))
    return lines


def _sharing_line(info: Mapping[str, Any]) -> str:
    """The card's sharing-depth line: one depth or one per task, and the blocks run per pass."""
    depth = info["share_layers"]
    if isinstance(depth, Mapping):
        shared = "per task, " + ", ".join(f"{t} below {k}" for t, k in depth.items())
    else:
        shared = f"below {depth}"
    line = (
        f"- Sharing depth: blocks {shared} shared; each task runs its expert's own blocks from there "
        "(`branches.<task>.*`)" + (", aligned at the branch point" if info.get("branch_align") else "")
    )
    if info.get("blocks_per_pass") is not None:
        line += f"; blocks run per pass: {info['blocks_per_pass']} (trunk max K_t + each task's own L - K_t)"
    return line


def _use_lines(shared: bool, arch: str) -> list[str]:
    """The card's "Use" section: stock transformers for a shared head, guardmerge otherwise."""
    if shared:
        return [
            "## Use",
            "",
            "```python",
            "import transformers",
            f"model = transformers.{arch}.from_pretrained('THIS_FOLDER')",
            "```",
            "",
        ]
    return [
        "## Use",
        "",
        "```python",
        "import guardmerge",
        "model = guardmerge.load('THIS_FOLDER')",
        "model.predict(['some text'])  # {task: [{'label': ..., 'score': ...}]}",
        "```",
        "",
        'or `guardmerge predict THIS_FOLDER "some text"`. Export one task to a stock '
        "transformers classifier with `guardmerge export THIS_FOLDER TASK OUT`.",
        "",
    ]


def model_card(result: MergeResult, config: MergeConfig, version: str) -> str:
    """Markdown naming the base, the experts, the method, its parameters and the version."""
    info = result.info
    shared = config.heads == "shared"
    arch = (result.config.get("architectures") or [result.config.get("model_type", "")])[0]
    lines = [
        "---",
        "library_name: guardmerge",
        f"base_model: {config.base_model}",
        "tags: [guardmerge, model-merging, multi-head, text-classification]",
        "---",
        "",
        f"# {'Model' if shared else 'Multi-head model'} merged with guardmerge {version}",
        "",
        (
            f"One stock `{arch}` checkpoint (body and head merged as one, `heads: shared`), "
            if shared
            else f"One shared {result.config.get('model_type', '')} encoder and {len(result.heads)} heads, "
        )
        + f"merged training-free from the experts below with **{config.method}**"
        + (", then healed by label-free distillation from them." if info.get("heal") else "."),
        "",
        f"- Base model: `{config.base_model}`",
        f"- Method: `{config.method}`, heads: `{config.heads}`",
        "- Parameters: " + (", ".join(f"`{k}={v}`" for k, v in info.get("parameters", {}).items()) or "(defaults)"),
        f"- guardmerge version: {version}",
        *_stage_lines(info),
        "",
        "| task (head) | labels | expert | weight |",
        "|---|---|---|---|",
    ]
    for ex in config.experts:
        spec = result.heads.get(ex.task)
        labels = ", ".join(spec.labels) if spec is not None else "(shared head)"
        if spec is not None:
            labels += spec.kind.card_note
        lines.append(f"| {ex.task} | {labels} | `{ex.model}` | {ex.weight} |")
    for section in info.get("card_sections") or []:
        lines += ["", str(section)]
    return "\n".join([*lines, "", *_use_lines(shared, arch)])
