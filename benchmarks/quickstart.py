"""The wall time of each command the READMEs quote with a duration, run as a user runs them, and what it reached.

    python benchmarks/quickstart.py                       # both examples: the default run and the demo
    python benchmarks/quickstart.py --example segmentation --precisions fp32,bf16

For each example a project is rendered into a temporary folder (amptpl must be installed here) and run with
`python -m PKG.train [--config configs/demo.yaml] log.live=false`, one run at a time; the line per run gives
the wall time, the final validation metrics and, for the demo, the loss scale's path (min and last) and the
skipped steps. Offline; nothing is kept. Run it on a quiet machine: a second job on 2 cores doubles every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_line

RUNS = {  # what the READMEs quote: the default run of each example, and its demo preset
    "default": [],
    "demo": ["--config", "configs/demo.yaml"],
}


def run(project: Path, package: str, args: list[str], out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"{package}.train", *args, "log.live=false", f"out_dir={out}"],
                          cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = next((r for r in reversed(records) if "val/loss" in r), {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k.startswith("val/") and k != "val/time_s"
                      and isinstance(v, float) and not k.startswith("val/dice_"))
    summary = json.loads((out / "amp_summary.json").read_text())
    precision = next((ln.split("precision: ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("precision:")),
                     summary.get("precision"))
    line = f"{wall:6.1f} s  [{precision}]  {shown}"
    if summary.get("amp/scale") is not None:
        line += (f"; scale min {summary['amp/scale_min']:g}, last {summary['amp/scale']:g}, "
                 f"skipped {summary['amp/skipped_steps']}")
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", action="append", help="bytelm, segmentation (default: both)")
    ap.add_argument("--precisions", default="auto", help="comma-separated amp.precision values for the default run")
    ap.add_argument("--only", choices=sorted(RUNS), help="only the default run or only the demo")
    args = ap.parse_args()
    print(cpu_line())
    for example in args.example or ["bytelm", "segmentation"]:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "amptpl", "new", "qs", "--dir", tmp, "--example", example],
                           check=True, capture_output=True)
            project = Path(tmp) / "qs"
            for name, extra in RUNS.items():
                if args.only and name != args.only:
                    continue
                precisions = args.precisions.split(",") if name == "default" else [None]
                for prec in precisions:
                    cmd = [*extra, *([f"amp.precision={prec}"] if prec else [])]
                    label = f"{example} {name}" + (f" amp.precision={prec}" if prec else "")
                    print(f"{label:<40} {run(project, 'qs', cmd, Path(tmp) / f'run-{name}-{prec}')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
