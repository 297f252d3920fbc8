"""Reliability evidence a guard team can read: faults injected and survived, malformed inputs
generated and refused, and the server held under load (issue 21).

Runs, at the current commit, and writes ``benchmarks/results/reliability.json``:

1. the fault-injection tests (``tests/io/test_faults.py``): merge, stats, export-onnx and finetune
   killed with SIGKILL at ``--kills`` random points each, four merges racing to one output, and a
   full disk for every writing command;
2. the format fuzzers (``tests/io/test_fuzz_formats.py``) with ``--fuzz-examples`` examples each;
3. the one-reader walk (``tests/io/test_readers.py``): every reader against every broken folder;
4. the soak results of ``benchmarks/soak.py`` (run it first: it takes the served model's folder),
   copied in with their own commit and date.

    python benchmarks/reliability.py [--kills 10] [--fuzz-examples 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, environment, produced

RESULTS = ROOT / "benchmarks" / "results"


def pytest(target: str, extra_env: dict[str, str], *marks: str) -> dict[str, object]:
    """Run one test module; its pass/fail counts and wall time."""
    started = time.perf_counter()
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", target]  # pyproject adds -q; -qq hides the counts
    if marks:
        args += ["-m", " or ".join(marks)]
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, **extra_env}, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
    return {"tests": counts, "seconds": round(time.perf_counter() - started, 1), "ok": proc.returncode == 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs per command")
    ap.add_argument("--fuzz-examples", type=int, default=1000, help="generated inputs per format")
    ap.add_argument("--soak", type=Path, default=RESULTS / "reliability_soak.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        faults, fuzz = Path(tmp) / "faults.json", Path(tmp) / "fuzz.json"
        fault_run = pytest(
            "tests/io/test_faults.py",
            {"GUARDMERGE_FAULT_KILLS": str(args.kills), "GUARDMERGE_FAULT_REPORT": str(faults)},
            "reliability",
        )
        fuzz_run = pytest(
            "tests/io/test_fuzz_formats.py",
            {"GUARDMERGE_FUZZ_EXAMPLES": str(args.fuzz_examples), "GUARDMERGE_FUZZ_REPORT": str(fuzz)},
        )
        readers_run = pytest("tests/io/test_readers.py", {})
        fault_counts = json.loads(faults.read_text()) if faults.is_file() else {}
        fuzz_counts = json.loads(fuzz.read_text()) if fuzz.is_file() else {}
    soak = json.loads(args.soak.read_text()) if args.soak.is_file() else None
    report = {
        "produced": produced("benchmarks/reliability.py", "tests/io"),
        "environment": environment(),
        "faults": {"settings": {"kills_per_command": args.kills}, **fault_run, "counts": fault_counts},
        "fuzz": {"settings": {"examples_per_format": args.fuzz_examples}, **fuzz_run, "counts": fuzz_counts},
        "readers": readers_run,
        "soak": soak,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "soak"}, indent=2))


if __name__ == "__main__":
    main()
