"""Bounded HTTP load test of ``guardmerge serve``, torch and onnx backends (loopback only).

For each backend it starts ``guardmerge serve MODEL`` itself on 127.0.0.1 (a free port), waits
for ``/healthz``, sends ``--warmup`` requests, then exactly ``--requests`` POST /v1/classify
requests, each with one text from the guard test sets (the model's tasks found in ``--data``,
shuffled with a fixed seed), from ``--concurrency`` concurrent clients. It reports requests/s,
latency percentiles, errors (any non-200 answer or transport failure) and the mean micro-batch
size read from ``/metrics``, then stops the server. For comparison it also measures the same
backend's offline throughput at a fixed batch of ``--max-batch`` texts (no HTTP), the ceiling
that micro-batching approaches. The onnx backend serves an fp32 export written to a temporary
folder. Results go to ``benchmarks/results/serve.json``.

    python benchmarks/serve_load.py guardmerge-demo/merged [--requests 5000] [--concurrency 16]
        [--backends torch onnx] [--threads N] [--data ../shared/data]

The client runs in this process and competes with the server for the CPU: on a small machine
the numbers are a lower bound on what the server alone does. The load average at start and end
is recorded next to the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from provenance import environment, produced

from guardmerge import __version__

log = logging.getLogger("serve_load")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
DEFAULT_OUT = HERE / "results" / "serve.json"
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0


def guard_texts(data: Path, tasks: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` texts cycled from the test sets of ``tasks`` (shuffled with ``seed``)."""
    from guardmerge.data import load_task

    pool: list[str] = []
    for task in tasks:
        if (data / task / "test.jsonl").is_file():
            pool += load_task(data / task).split("test").texts
    if not pool:
        raise SystemExit(f"no test.jsonl for any of {tasks} under {data}")
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, backend: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "guardmerge.cli",
        "-q",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend",
        backend,
        "--no-access-log",
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log.info("starting: %s", " ".join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server did not answer /healthz within {START_TIMEOUT_S:.0f} s")


async def load(url: str, texts: list[str], concurrency: int) -> tuple[list[float], int, float, list[str]]:
    """Send one request per text with ``concurrency`` workers: (latencies s, errors, wall s, samples)."""
    latencies: list[float] = []
    errors = 0
    samples: list[str] = []
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_i, errors
            while next_i < len(texts):
                text = texts[next_i]
                next_i += 1
                t0 = time.perf_counter()
                try:
                    res = await client.post("/v1/classify", json={"texts": [text]})
                    ok = res.status_code == 200
                    if not ok and len(samples) < 5:
                        samples.append(f"{res.status_code}: {res.text[:200]}")
                except httpx.HTTPError as exc:
                    ok = False
                    if len(samples) < 5:
                        samples.append(repr(exc))
                latencies.append(time.perf_counter() - t0)
                errors += 0 if ok else 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, errors, wall, samples


def batch_stats(metrics_text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name in ("guardmerge_batch_size_sum", "guardmerge_batch_size_count"):
                values[s.name] = s.value
    count = values.get("guardmerge_batch_size_count", 0.0)
    total = values.get("guardmerge_batch_size_sum", 0.0)
    return {"batches": count, "texts": total, "mean_batch_size": total / count if count else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def offline_throughput(model: Path, backend: str, texts: list[str], batch: int, threads: int | None) -> float:
    """Texts/s of the backend alone at a fixed batch size (the micro-batching ceiling)."""
    from guardmerge.serve import load_backend

    runner = load_backend(model, backend, threads=threads)
    try:
        runner.logits(texts[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            runner.logits(texts[i : i + batch])
        return len(texts) / (time.perf_counter() - start)
    finally:
        runner.close()


def load_summary(lat: list[float], errors: int, wall: float, samples: list[str]) -> dict[str, Any]:
    """What :func:`load` measured: requests, errors, requests/s and latency percentiles (ms)."""
    return {
        "requests": len(lat),
        "errors": errors,
        "error_samples": samples,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {
            "p50": round(1000 * percentile(lat, 50), 2),
            "p95": round(1000 * percentile(lat, 95), 2),
            "p99": round(1000 * percentile(lat, 99), 2),
            "mean": round(1000 * statistics.fmean(lat), 2),
            "max": round(1000 * max(lat), 2),
        },
    }


def run_backend(model: Path, backend: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, backend, port, args)
    try:
        wait_ready(proc, url)
        asyncio.run(load(url, texts[: args.warmup], args.concurrency))
        before = batch_stats(httpx.get(f"{url}/metrics", timeout=10).text)
        lat, errors, wall, samples = asyncio.run(load(url, texts[: args.requests], args.concurrency))
        after = batch_stats(httpx.get(f"{url}/metrics", timeout=10).text)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    batches = after["batches"] - before["batches"]
    served = after["texts"] - before["texts"]
    result = {
        **load_summary(lat, errors, wall, samples),
        "concurrency": args.concurrency,
        "micro_batches": int(batches),
        "mean_batch_size": round(served / batches, 2) if batches else 0.0,
    }
    log.info("%s: %s", backend, json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="A merged model folder (e.g. guardmerge-demo/merged).")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Folder of task folders with test.jsonl.")
    p.add_argument("--requests", type=int, default=5000, help="Requests per backend (fixed count).")
    p.add_argument("--concurrency", type=int, default=16, help="Concurrent clients.")
    p.add_argument("--warmup", type=int, default=64, help="Requests before measuring.")
    p.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    p.add_argument("--threads", type=int, default=None, help="Server inference threads (default: runtime's).")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--offline-texts", type=int, default=512, help="Texts for the offline batch throughput.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--requests and --concurrency must be positive")

    import guardmerge

    tasks = guardmerge.load(str(args.model)).tasks
    texts = guard_texts(args.data, tasks, max(args.requests, args.warmup, args.offline_texts))
    load_start = os.getloadavg()
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        for backend in args.backends:
            source = args.model
            if backend == "onnx":  # export once, outside the timed part
                from guardmerge.export.onnx import export_onnx

                source = export_onnx(guardmerge.load(str(args.model)), tmp / "onnx")
            offline = offline_throughput(source, backend, texts[: args.offline_texts], args.max_batch, args.threads)
            row = run_backend(source, backend, texts, args)
            results[backend] = {"produced": produced("benchmarks/serve_load.py"), **row}
            results[backend]["offline_batch_texts_per_s"] = round(offline, 1)
            results[backend]["offline_batch"] = args.max_batch
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "serve_load",
        "produced": produced("benchmarks/serve_load.py"),
        "environment": environment(),
        "model": str(args.model),
        "tasks": tasks,
        "guardmerge_version": __version__,
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "texts_per_request": 1,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "threads": args.threads,
            "max_length": "model default (512)",
            "host": "127.0.0.1",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for backend, r in results.items():
        log.info(
            "%-5s %6.1f req/s  p50 %.1f ms  p95 %.1f ms  errors %d  mean batch %.1f  (offline batch-%d: %.1f texts/s)",
            backend,
            r["requests_per_s"],
            r["latency_ms"]["p50"],
            r["latency_ms"]["p95"],
            r["errors"],
            r["mean_batch_size"],
            r["offline_batch"],
            r["offline_batch_texts_per_s"],
        )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
