"""The default example trained in fp32, bf16 and fp16 for the same number of steps: speed and final val loss.

    python benchmarks/precision.py            # the template's default model; long on a CPU (fp16 especially)
    python benchmarks/precision.py --quick    # a smaller model and fewer steps: a few minutes on 2 CPU cores

Each precision is one real training run of the template (``python -m project.train`` from this checkout's
template/src, offline, on the Python standard library's sources), in a fresh process, from the same seed,
with the same data order and schedule. The step time is the median of ``perf/step_time_s`` over the log
intervals in ``metrics.jsonl`` (wall time per optimizer step; the first interval, with the warm-up, is left
out); the final validation loss is the run's last eval (whole validation split, float32 outside autocast).
Speed-ups and losses are relative to fp32. It also says what ``amp.precision=auto`` picks on this machine.
fp16 on a CPU runs through a real CPU GradScaler without fast fp16 kernels: slow by design, a correctness
path. The last line is machine-readable:

    RESULT bf16_speedup=<fp32 time / bf16 time> fp16_speedup=<x> auto_pick=<p> rule_pick=<p>
           bf16_val_loss_rel=<bf16 / fp32> fp16_val_loss_rel=<x>

``auto_pick`` is what ``auto`` runs when it times the model (the default), decided on these runs' step times;
``rule_pick`` what the hardware rule alone picks.

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

MODES = {
    # the template's own defaults (d_model 192, 4 layers, batch 32, seq_len 128), fewer steps than its 500
    "full": {"train.max_steps": 100, "train.warmup_steps": 10},
    "quick": {"model.d_model": 64, "model.n_layer": 2, "model.n_head": 4, "data.seq_len": 64, "train.batch_size": 16,
              "data.max_bytes": 600_000, "train.max_steps": 150, "train.warmup_steps": 15},
}
COMMON = {"log.every": 10, "log.live": "false", "checkpoint.every": 0, "eval.every": 0, "eval.batches": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (a few minutes on 2 cores)")
    p.add_argument("--precisions", default="fp32,bf16,fp16", help="comma-separated: fp32,bf16,fp16 (fp32 always runs)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: 100, quick 150)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the runs (OMP_NUM_THREADS; default: torch's)")
    args = p.parse_args(argv)
    names = [x.strip() for x in args.precisions.split(",") if x.strip()]
    for name in names:
        if name not in ("fp32", "bf16", "fp16"):
            p.error(f"--precisions: {name!r} is not one of fp32, bf16, fp16")
    args.precisions = ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]
    if args.steps is not None and args.steps < 20:
        p.error("--steps must be >= 20 (two log intervals after the first)")
    return args


def overrides(args: argparse.Namespace) -> dict[str, object]:
    out = {**MODES["quick" if args.quick else "full"], **COMMON}
    if args.steps:
        out["train.max_steps"] = args.steps
    return out


def train(prec: str, keys: dict[str, object], out_dir: Path, threads: int) -> dict:
    """One training run; its step time, final val loss, skipped steps and wall time."""
    argv = [sys.executable, "-m", "project.train", f"amp.precision={prec}", f"out_dir={out_dir}",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(TEMPLATE_SRC))
    import torch
    from project.amp import precision

    keys = overrides(args)
    auto = precision.resolve("auto", "cpu" if not torch.cuda.is_available() else "cuda")
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"torch threads {args.threads or torch.get_num_threads()}")
    print(cpu_line())
    print(f"{'quick' if args.quick else 'full'} mode, every precision: "
          + " ".join(f"{k}={v}" for k, v in keys.items() if k not in COMMON)
          + " (other keys: the template's defaults; eval on the whole validation split at the end)")
    print(f"auto picks {auto.effective} here ({auto.reason})\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        for prec in args.precisions:
            print(f"{prec} ...", flush=True)
            rows.append(train(prec, keys, Path(tmp) / prec, args.threads))
    ref = rows[0]
    head = ["precision", "ms/step", "speed-up", "val loss", "val loss / fp32", "skipped", "run took"]
    body = [[r["precision"], f"{1e3 * r['step_time_s']:.1f}", f"{ref['step_time_s'] / r['step_time_s']:.2f}x",
             f"{r['val_loss']:.4f}", f"{r['val_loss'] / ref['val_loss']:.4f}", str(r["skipped"]), f"{r['took_s']:.0f}s"]
            for r in rows]
    print(table(head, body))
    by = {r["precision"]: r for r in rows}

    def rel(p: str, key: str, inverse: bool = False) -> str:
        if p not in by:
            return "nan"
        return f"{(ref[key] / by[p][key]) if inverse else (by[p][key] / ref[key]):.4f}"

    # what auto runs when it times this model (amp.auto.measure, the default): the same decision on these step times
    from project.amp.autopick import candidates, decide

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    timed = decide(auto, {p: by[p]["step_time_s"] for p in candidates(device) if p in by}, cached=False)
    print(f"timed on this model, auto runs {timed.effective} ({timed.reason})")
    print(f"\nRESULT bf16_speedup={rel('bf16', 'step_time_s', True)} fp16_speedup={rel('fp16', 'step_time_s', True)} "
          f"auto_pick={timed.effective} rule_pick={auto.effective} bf16_val_loss_rel={rel('bf16', 'val_loss')} "
          f"fp16_val_loss_rel={rel('fp16', 'val_loss')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
