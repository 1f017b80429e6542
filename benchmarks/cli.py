"""What `amptpl new` costs: CPU and wall time per fresh process, and which imports the time goes to.

    python benchmarks/cli.py               # 10 runs, a few seconds
    python benchmarks/cli.py -n 30 --top 15

Each run is a fresh `python -m amptpl new bench --dir <temp dir>`, as a user types it, so every run pays the
interpreter start and every import again. CPU time is the child's user+sys time, from the difference of
`resource.getrusage(RUSAGE_CHILDREN)` around the run: on a shared machine it does not count the time other
processes held the cores, which the wall clock does. One warm-up run (not counted) fills the page cache.

One more run, under `python -X importtime`, lists every module the command imported: it says whether torch
(or accelerate, datasets, evaluate) was imported, which must never happen for `new`, and where the import
time goes, summed per top-level package (self time, so nothing is counted twice). -X importtime itself slows
imports down a little; that run is not part of the timings.

The last line is machine-readable:

    RESULT new_seconds=<median CPU seconds per run> torch_imported=<0|1>

It prints numbers and never fails on a slow machine: there is no threshold to pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HEAVY = ("torch", "accelerate", "datasets", "evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--runs", type=int, default=10, help="timed runs, each a fresh process (default 10)")
    p.add_argument("--top", type=int, default=10, help="how many packages to list by import time (default 10)")
    p.add_argument("--python", default=sys.executable, help="the interpreter amptpl is installed in")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    return args


def new_command(python: str, where: Path, *flags: str) -> list[str]:
    return [python, *flags, "-m", "amptpl", "new", "bench", "--dir", str(where)]


def child_env() -> dict[str, str]:
    # a fixed, colourless terminal: the same work whatever terminal the benchmark runs in
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "100", "TERMINAL_WIDTH": "100"}


def timed_run(python: str) -> tuple[float, float]:
    """One fresh `amptpl new` into a temp dir: (wall seconds, CPU seconds of the child)."""
    with tempfile.TemporaryDirectory(prefix="amptpl-bench-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(new_command(python, Path(tmp)), env=child_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"`amptpl new` failed with exit code {proc.returncode}:\n{proc.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def import_profile(python: str) -> list[tuple[str, int, int]]:
    """(module, self µs, nesting depth) for every import of one `python -X importtime -m amptpl new` run."""
    with tempfile.TemporaryDirectory(prefix="amptpl-bench-") as tmp:
        proc = subprocess.run(
            new_command(python, Path(tmp), "-X", "importtime"), env=child_env(), capture_output=True, text=True
        )
    if proc.returncode != 0:
        raise SystemExit(f"`amptpl new` failed with exit code {proc.returncode}:\n{proc.stderr.strip()}")
    modules = []
    for line in proc.stderr.splitlines():
        # "import time:       322 |      72304 |   amptpl.cli"; the header line has no numbers
        if not line.startswith("import time:"):
            continue
        self_us, _, name = line.removeprefix("import time:").split("|", 2)
        if not self_us.strip().isdigit():
            continue
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        modules.append((name.strip(), int(self_us), depth))
    return modules


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"amptpl new: {args.runs} fresh processes, {args.python}")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")

    timed_run(args.python)  # warm-up: page cache, .pyc files
    walls, cpus = [], []
    for i in range(args.runs):
        wall, cpu = timed_run(args.python)
        walls.append(wall)
        cpus.append(cpu)
        print(f"  run {i + 1:>3}  wall {wall:6.3f} s   cpu {cpu:6.3f} s")

    print()
    print(f"{'':10} {'median':>8} {'min':>8} {'max':>8}")
    for label, values in (("wall s", walls), ("cpu s", cpus)):
        print(f"{label:10} {statistics.median(values):8.3f} {min(values):8.3f} {max(values):8.3f}")

    modules = import_profile(args.python)
    heavy = sorted({m for m, _, _ in modules if m.split(".")[0] in HEAVY})
    torch_imported = any(m == "torch" or m.startswith("torch.") for m in heavy)
    per_package: dict[str, int] = defaultdict(int)
    for name, self_us, _ in modules:
        per_package[name.split(".")[0]] += self_us
    total = sum(per_package.values())
    print()
    print(f"imports: {len(modules)} modules, {total / 1000:.1f} ms in all (self time, under -X importtime)")
    if heavy:
        print(f"heavy modules imported: {', '.join(heavy[:8])}{' ...' if len(heavy) > 8 else ''}")
    else:
        print(f"heavy modules imported: none of {', '.join(HEAVY)}")
    print(f"top {args.top} packages by import time:")
    for name, us in sorted(per_package.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:24} {us / 1000:7.1f} ms  {100 * us / total:5.1f} %")

    print(f"RESULT new_seconds={statistics.median(cpus):.3f} torch_imported={int(torch_imported)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
