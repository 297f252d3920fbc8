"""Ray Serve against the single-process server: the same bounded HTTP load (loopback only).

    python benchmarks/ray_serve_load.py guardmerge-demo/merged [--requests 2000] [--concurrency 16]
        [--replicas 1 2] [--threads 1] [--data ../shared/data]

For each set-up it starts the server itself on 127.0.0.1 (a free port): ``guardmerge serve MODEL``
(``single``), then ``guardmerge serve MODEL --ray local --replicas N`` for each ``--replicas``
(a local Ray cluster started by the command, Ray Serve's proxy in front, each replica batching
with ``@serve.batch``). It waits for ``/healthz``, sends ``--warmup`` requests, then exactly
``--requests`` POST /v1/classify requests of one guard test-set text each (the model's tasks found
in ``--data``, shuffled with a fixed seed) from ``--concurrency`` concurrent clients, and records
requests/s, latency percentiles and errors (any non-200 answer or transport failure). The client
shares the machine with the servers: on 2 cores, replicas compete for the same CPUs, so the
figures say what Ray's proxy and batching cost here, not what a cluster gains.
Writes benchmarks/results/ray_serve.json (each row with the commit and date that produced it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from provenance import environment, produced
from serve_load import DEFAULT_DATA, free_port, guard_texts, load, load_summary, wait_ready

log = logging.getLogger("ray_serve_load")

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "ray_serve.json"
SOURCES = ("benchmarks/ray_serve_load.py", "benchmarks/serve_load.py")


def start(model: Path, port: int, replicas: int | None, args: argparse.Namespace) -> subprocess.Popen:
    """``guardmerge serve`` on ``port``: one process, or (``replicas``) on a local Ray cluster."""
    cmd = [sys.executable, "-m", "guardmerge.cli", "-q", "serve", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-access-log", "--max-batch", str(args.max_batch)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), *(["--threads", str(args.threads)] if args.threads else [])]
    cmd += [f"--threshold={t}" for t in args.threshold]
    if replicas is not None:
        cmd += ["--ray", "local", "--replicas", str(replicas)]
    log.info("starting: %s", " ".join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def measure(model: Path, replicas: int | None, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One set-up's requests/s, latencies and errors under the load."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(model, port, replicas, args)
    try:
        wait_ready(proc, url)
        asyncio.run(load(url, texts[: args.warmup], args.concurrency))
        lat, errors, wall, samples = asyncio.run(load(url, texts[: args.requests], args.concurrency))
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    row = {"produced": produced(*SOURCES), "replicas": replicas, **load_summary(lat, errors, wall, samples)}
    log.info("%s: %s", "single" if replicas is None else f"ray x{replicas}", json.dumps(row))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="A merged model folder (e.g. guardmerge-demo/merged).")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Folder of task folders with test.jsonl.")
    p.add_argument("--requests", type=int, default=2000, help="Requests per set-up (fixed count).")
    p.add_argument("--concurrency", type=int, default=16, help="Concurrent clients.")
    p.add_argument("--warmup", type=int, default=64, help="Requests before measuring.")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Ray Serve replica counts to measure.")
    p.add_argument("--threads", type=int, default=1, help="Inference threads per server process or replica.")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threshold", action="append", default=[], help="A serve --threshold, e.g. emotion=off.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.requests < 1 or args.concurrency < 1 or min(args.replicas) < 1:
        raise SystemExit("--requests, --concurrency and --replicas must be positive")

    import guardmerge

    tasks = guardmerge.load(str(args.model)).tasks
    texts = guard_texts(args.data, tasks, max(args.requests, args.warmup))
    rows = {"single": measure(args.model, None, texts, args)}
    for n in args.replicas:
        rows[f"ray_x{n}"] = measure(args.model, n, texts, args)
    base = rows["single"]["requests_per_s"]
    for row in rows.values():
        row["throughput_vs_single"] = round(row["requests_per_s"] / base, 3) if base else None
    report = {
        "benchmark": "ray_serve_load",
        "produced": produced(*SOURCES),
        "environment": environment(),
        "model": str(args.model),
        "tasks": tasks,
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "texts_per_request": 1,
            "threads": args.threads,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "thresholds": args.threshold,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
