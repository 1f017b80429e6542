"""The default example trained in each precision for the same number of steps, at two model sizes and several
seeds: speed, final val loss, and what ``auto`` picks.

    python benchmarks/precision.py                      # default and wide models, 3 seeds each (long on a CPU)
    python benchmarks/precision.py --sizes default --seeds 1
    python benchmarks/precision.py --quick              # a small model and fewer steps: a few minutes on 2 cores

Sizes: ``default`` is the template's own model (d_model 192, 4 layers, batch 32 x 128 bytes); ``wide`` is d_model 384,
6 layers, the same batch; ``quick`` is d_model 64, 2 layers, batch 16 x 64 bytes. Each run is one real training
run of the template (``python -m project.train`` from this checkout's template/src, offline, on the Python standard
library's sources), in a fresh process, with torch's own thread count (what a user gets; ``--threads`` to set it),
the same data order and schedule for every precision of a seed. The step time is the median of
``perf/step_time_s`` over the log intervals in ``metrics.jsonl`` (the first, with the warm-up, left out), taken
over the seeds; the final validation loss is the run's last eval (the whole validation split), as mean and spread
over the seeds. Speed-ups and losses are relative to fp32 at the same size. fp16 on a CPU runs through a real CPU
GradScaler: fast only where the CPU has AVX512-FP16 or AMX-FP16. Per size it says what ``amp.precision=auto``
runs when it times the model (its default; the same decision, on these step times, over the candidates it weighs
by default) and what the hardware rule alone picks. The last line is machine-readable, one field per size and
precision, e.g.:

    RESULT default_auto_pick=<p> default_fastest=<p> default_auto_agrees=<yes: within 5% of the fastest>
           default_bf16_speedup=<fp32 time / bf16 time> default_bf16_val_loss_rel=<bf16 / fp32> ... rule_pick=<p>

It prints numbers and never fails on a slow machine: there is no threshold to pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import TEMPLATE_SRC, cpu_line, table, template_env

SIZES = {
    "default": {},  # the template's own model and batch
    "wide": {"model.d_model": 384, "model.n_layer": 6, "model.n_head": 6},
    "quick": {"model.d_model": 64, "model.n_layer": 2, "model.n_head": 4, "data.seq_len": 64, "train.batch_size": 16,
              "data.max_bytes": 600_000},
}
STEPS = {"default": 100, "wide": 100, "quick": 150}
NAMES = ("fp32", "bf16", "fp16", "bf16-true")
COMMON = {"amp.log_every": 10, "amp.live": "false", "amp.checkpoint_every": 0, "eval.every": 0, "eval.batches": 0,
          "amp.auto.measure": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="--sizes quick --seeds 1: a few minutes on 2 cores")
    p.add_argument("--sizes", default="default,wide", help=f"comma-separated: {','.join(SIZES)} (default default,wide)")
    p.add_argument("--precisions", default=",".join(NAMES), help=f"comma-separated: {','.join(NAMES)} (fp32 always runs)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per size and precision (default 3)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: 100, quick 150)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the runs (OMP_NUM_THREADS; default: torch's)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds = "quick", 1
    args.sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    for size in args.sizes:
        if size not in SIZES:
            p.error(f"--sizes: {size!r} is not one of {', '.join(SIZES)}")
    names = [x.strip() for x in args.precisions.split(",") if x.strip()]
    for name in names:
        if name not in NAMES:
            p.error(f"--precisions: {name!r} is not one of {', '.join(NAMES)}")
    args.precisions = ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]
    if args.steps is not None and args.steps < 20:
        p.error("--steps must be >= 20 (two log intervals after the first)")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def overrides(args: argparse.Namespace, size: str) -> dict[str, object]:
    steps = args.steps or STEPS[size]
    return {**SIZES[size], "train.max_steps": steps, "train.warmup_steps": steps // 10, **COMMON}


def train(prec: str, keys: dict[str, object], out_dir: Path, threads: int, seed: int) -> dict:
    """One training run; its step time, final val loss, skipped steps and wall time."""
    argv = [sys.executable, "-m", "project.train", f"amp.precision={prec}", f"out_dir={out_dir}", f"seed={seed}",
            *(f"{k}={v}" for k, v in keys.items())]
    t0 = time.perf_counter()
    env = {**template_env(), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the {prec} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r][1:]  # the first holds the warm-up
    val = [r["val/loss"] for r in records if "val/loss" in r]
    summary = json.loads((out_dir / "amp_summary.json").read_text())
    return {"precision": prec, "step_time_s": statistics.median(times), "val_loss": val[-1],
            "skipped": summary.get("amp/skipped_steps", 0), "took_s": took}


def report(size: str, keys: dict[str, object], runs: dict[str, list[dict]], auto: object) -> dict[str, object]:
    """The table of one size and its RESULT fields."""
    from project.amp.debug.autopick import NOISE, candidates, decide

    def time_of(p: str) -> float:
        return statistics.median(r["step_time_s"] for r in runs[p])

    def loss_of(p: str) -> float:
        return statistics.mean(r["val_loss"] for r in runs[p])

    ref_t, ref_l = time_of("fp32"), loss_of("fp32")
    print(f"\n{size}: " + " ".join(f"{k}={v}" for k, v in keys.items() if k not in COMMON)
          + f", {len(runs['fp32'])} seed(s)")
    head = ["precision", "ms/step", "speed-up", "val loss (mean, min-max)", "val loss / fp32", "skipped", "runs took"]
    body = []
    for p, rs in runs.items():
        ls = [r["val_loss"] for r in rs]
        body.append([p, f"{1e3 * time_of(p):.1f}", f"{ref_t / time_of(p):.2f}x",
                     f"{loss_of(p):.4f} ({min(ls):.4f}-{max(ls):.4f})", f"{loss_of(p) / ref_l:.4f}",
                     "/".join(str(r["skipped"]) for r in rs), f"{sum(r['took_s'] for r in rs):.0f}s"])
    print(table(head, body))
    device = "cuda" if auto.device_type == "cuda" else "cpu"
    weighed = {p: time_of(p) for p in candidates(device) if p in runs}
    timed = decide(auto, weighed, cached=False)
    fastest = min(runs, key=time_of)
    print(f"auto, timing this model (its default), runs {timed.effective} ({timed.reason}); "
          f"the fastest here: {fastest}" + ("" if fastest in weighed else
                                            f" (auto weighs {', '.join(weighed)} unless amp.auto.candidates adds it)"))
    agrees = time_of(timed.effective) <= time_of(fastest) * (1 + NOISE)  # within the noise auto itself allows
    print(f"auto's pick is {'within' if agrees else 'NOT within'} {100 * NOISE:.0f}% of the fastest")
    out: dict[str, object] = {f"{size}_auto_pick": timed.effective, f"{size}_fastest": fastest,
                              f"{size}_auto_agrees": "yes" if agrees else "no"}
    for p in runs:
        if p != "fp32":
            out[f"{size}_{p}_speedup"] = f"{ref_t / time_of(p):.4f}"
            out[f"{size}_{p}_val_loss_rel"] = f"{loss_of(p) / ref_l:.4f}"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(TEMPLATE_SRC))
    import torch
    from project.amp import precision

    auto = precision.resolve("auto", "cpu" if not torch.cuda.is_available() else "cuda")
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"torch threads {args.threads or torch.get_num_threads()}")
    print(cpu_line())
    print(f"precisions {', '.join(args.precisions)}; seeds 0-{args.seeds - 1}; other keys: the template's defaults; "
          "eval on the whole validation split at the end")
    print(f"the hardware rule alone picks {auto.effective} here ({auto.reason})")
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        for size in args.sizes:
            keys = overrides(args, size)
            runs: dict[str, list[dict]] = {p: [] for p in args.precisions}
            for seed in range(args.seeds):
                for prec in args.precisions:
                    print(f"{size} seed {seed} {prec} ...", flush=True)
                    runs[prec].append(train(prec, keys, Path(tmp) / f"{size}-{seed}-{prec}", args.threads, seed))
            result.update(report(size, keys, runs, auto))
    result["rule_pick"] = auto.effective
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
