"""The wall time of each command the READMEs quote with a duration, run as a user runs them, and what it reached.

    python benchmarks/quickstart.py                       # every quoted command, both examples
    python benchmarks/quickstart.py --example segmentation --precisions fp32,bf16 --only default

For each example a project is rendered into a temporary folder (amptpl must be installed here) and each
command runs there the way the Quickstart shows it, one at a time, with `amp.live=false`:

- default: `python -m PKG.train` (the example's default run), once per `--precisions` value;
- demo: `python -m PKG.train --config configs/demo.yaml` (fp16 with the CPU GradScaler);
- run: `amptpl run PROJECT train.max_steps=200` (the byte LM only, as in the Quickstart);
- two: `amptpl run PROJECT --num-processes 2 train.max_steps=100` (2 gloo ranks);
- bench: `python -m PKG.bench --steps 5`.

The first line names the CPU and the 1-minute load average before the first command (near 0: a quiet
machine; each other busy process adds about 1, and on 2 cores one of them can double every time). The line per
command gives its wall time, the precision it ran, the final validation metrics and, for fp16, the loss
scale's path and the skipped steps. `auto`'s cache starts empty, as on a newcomer's machine: the first run of
each example includes the timing of fp32 against bf16, the later ones read it. Offline; nothing is kept.
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

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def commands(project: Path, example: str, precisions: list[str]) -> dict[str, list[str]]:
    """Label -> argv, as the Quickstart quotes them; out_dir=... is added per command."""
    train = [sys.executable, "-m", "qs.train", "amp.live=false"]
    cli = [sys.executable, "-m", "amptpl", "run", str(project)]
    cmds = {f"default amp.precision={p}" if p != "auto" else "default": [*train, f"amp.precision={p}"]
            for p in precisions}
    cmds["demo"] = [*train, "--config", "configs/demo.yaml"]
    if example == "bytelm":
        cmds["run"] = [*cli, "train.max_steps=200", "amp.live=false"]
        cmds["two"] = [*cli, "--num-processes", "2", "train.max_steps=100", "amp.live=false"]
        cmds["bench"] = [sys.executable, "-m", "qs.bench", "--steps", "5"]
    return cmds


def outcome(out: Path, stdout: str) -> str:
    """The precision, the last validation metrics and the loss scale's path of the run in ``out``."""
    if (out / "bench.json").exists():  # bench: its verdict
        return json.loads((out / "bench.json").read_text())["auto"]["text"]
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    val = next((r for r in reversed(records) if "val/loss" in r), {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k.startswith("val/") and k != "val/time_s"
                      and isinstance(v, float) and not k.startswith("val/dice_"))
    summary = json.loads((out / "amp_summary.json").read_text())
    precision = next((ln.split("precision: ", 1)[1] for ln in stdout.splitlines() if ln.startswith("precision:")),
                     summary.get("precision"))
    line = f"[{precision}]  {shown}"
    if summary.get("amp/scale") is not None:
        line += (f"; scale min {summary['amp/scale_min']:g}, last {summary['amp/scale']:g}, "
                 f"skipped {summary['amp/skipped_steps']}")
    return line


def timed(argv: list[str], project: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(project / "src"), **OFFLINE}
    t0 = time.perf_counter()
    proc = subprocess.run([*argv, f"out_dir={out}"], cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return f"{wall:6.1f} s  {outcome(out, proc.stdout)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", action="append", help="bytelm, segmentation (default: both)")
    ap.add_argument("--precisions", default="auto", help="comma-separated amp.precision values for the default run")
    ap.add_argument("--only", action="append", choices=["default", "demo", "run", "two", "bench"],
                    help="only these commands (repeatable)")
    args = ap.parse_args()
    print(f"{cpu_line()}; load average {os.getloadavg()[0]:.2f} before the first command")
    with tempfile.TemporaryDirectory(prefix="amptpl-cache-") as cache:
        os.environ["AMPTPL_CACHE_DIR"] = cache  # empty, as on a fresh machine
        for example in args.example or ["bytelm", "segmentation"]:
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "amptpl", "new", "qs", "--dir", tmp, "--example", example],
                               check=True, capture_output=True)
                project = Path(tmp) / "qs"
                for i, (label, argv) in enumerate(commands(project, example, args.precisions.split(",")).items()):
                    if args.only and label.split()[0] not in args.only:
                        continue
                    print(f"{example + ' ' + label:<40} {timed(argv, project, Path(tmp) / f'run-{i}')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
