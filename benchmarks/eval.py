"""What one evaluation of the generated project costs next to a plain torch-sum evaluation of the same batches.

    python benchmarks/eval.py            # the template's default model, 20 validation batches
    python benchmarks/eval.py --quick    # a smaller model: well under a minute on 2 CPU cores

Two evaluations of the same prepared model on the same validation batches, in one process:

    (A) plain   autocast forward -> float32 cross-entropy summed in torch, correct bytes summed in torch; one
                read (.item()) of the three sums at the end
    (B) train   ``train.evaluate``: the same forward, per-sample sums stacked in float64 and passed through
                ``accelerator.gather_for_metrics`` (it drops the samples Accelerate repeats to even out the last
                batch on several processes), one row of sums per batch, one transfer, then the project's
                ``evaluate`` module (``metrics.py``) fed per-batch sums and ``compute()``

They alternate A B / B A / ... (who goes first rotates) after one untimed round of each; the ratio B/A is taken
within each round and the median over rounds is reported, in process CPU time by default (--clock) with the
wall-clock ratio beside it; torch runs on one thread by default (--threads 1), as in overhead.py: on a busy
2-core machine two OpenMP threads mostly time each other's waiting. The two losses are printed side by side:
they must agree. The template is imported from this checkout (template/src, package ``project``); offline.
The last line is machine-readable:

    RESULT eval_overhead=<median B/A time of one evaluation>

It prints numbers and never fails on a slow machine: there is no threshold to pass.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

from _common import TEMPLATE_SRC, cpu_line, table

MODES = {
    "full": {},  # the template's defaults: d_model 192, 4 layers, batch 32, seq_len 128, eval.batches 20
    "quick": {"model.d_model": 64, "model.n_layer": 2, "model.n_head": 4, "data.seq_len": 64, "train.batch_size": 16,
              "data.max_bytes": 600_000},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model (well under a minute on 2 cores)")
    p.add_argument("--rounds", type=int, help="rounds of one A and one B evaluation (default 10, quick 12)")
    p.add_argument("--batches", type=int, default=20, help="validation batches per evaluation (eval.batches)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast of the forward")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the clock of the RESULT line")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's own choice)")
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    args.rounds = args.rounds or (12 if args.quick else 10)
    if args.rounds < 1 or args.batches < 1:
        p.error("--rounds and --batches must be >= 1")
    return args


def plain_evaluate(model, loader, accelerator, max_batches: int) -> dict[str, float]:
    """(A) The same numbers with torch sums on the device and one read at the end."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll = correct = count = None
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i >= max_batches:
                break
            with accelerator.autocast():
                logits = model(x)
            batch_nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="sum").double()
            batch_correct = (logits.argmax(-1) == y).sum()
            nll = batch_nll if nll is None else nll + batch_nll
            correct = batch_correct if correct is None else correct + batch_correct
            count = y.numel() if count is None else count + y.numel()
    model.train()
    loss = nll.item() / count
    return {"val/loss": loss, "val/accuracy": correct.item() / count, "val/perplexity": math.exp(loss)}


def timed(fn) -> tuple[float, float, dict]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(TEMPLATE_SRC))
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from project.amp import precision
    from project.amp.precision import has_accelerator
    from project.config import parse_args as config_args
    from project.example import build_data, load_metric
    from project.steps import build_model, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = config_args([f"{k}={v}" for k, v in MODES[args.mode].items()] + [f"amp.precision={args.precision}"])
    cpu = not has_accelerator()
    res = precision.resolve(args.precision, "cpu" if cpu else "cuda")
    accelerator = Accelerator(cpu=cpu, **precision.accelerator_kwargs(res))
    set_seed(cfg.seed)
    _, val_loader, _ = build_data(cfg, accelerator)
    model, val_loader = accelerator.prepare(build_model(cfg), val_loader)
    metric = load_metric()
    batches = min(args.batches, len(val_loader))

    print(f"torch {torch.__version__}, python {platform.python_version()}, torch threads {torch.get_num_threads()}")
    print(cpu_line())
    shape = " ".join(f"{k}={v}" for k, v in MODES[args.mode].items()) or "the template's default model and data"
    print(f"{args.mode} mode: {shape}; {res.effective} on {accelerator.device}; {batches} validation batches of "
          f"{cfg.train.batch_size} x {cfg.data.seq_len} bytes; {args.rounds} rounds, A/B order alternating\n")

    runs = {"A": lambda: plain_evaluate(model, val_loader, accelerator, batches),
            "B": lambda: evaluate(model, val_loader, accelerator, metric, batches)}
    for fn in runs.values():  # untimed: first-call costs (the metric's Arrow writer, kernels)
        fn()
    times: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    results = {}
    for r in range(args.rounds):
        for name in ("AB" if r % 2 == 0 else "BA"):
            cpu_s, wall_s, results[name] = timed(runs[name])
            times[name].append((cpu_s, wall_s))

    rows = []
    ratio = {}
    for i, clock in enumerate(("cpu", "wall")):
        a = [t[i] for t in times["A"]]
        b = [t[i] for t in times["B"]]
        per_round = [y / x for x, y in zip(a, b, strict=True)]
        ratio[clock] = statistics.median(per_round)
        rows.append([clock, f"{1e3 * statistics.median(a):.1f}", f"{1e3 * statistics.median(b):.1f}",
                     f"{ratio[clock]:.4f}", f"{min(per_round):.3f}-{max(per_round):.3f}"])
    print(table(["clock", "A plain ms", "B train.evaluate ms", "B/A", "B/A range"], rows))
    la, lb = results["A"]["val/loss"], results["B"]["val/loss"]
    print(f"\nval/loss A {la:.6f}  B {lb:.6f} (difference {abs(la - lb):.2e}); "
          f"val/accuracy A {results['A']['val/accuracy']:.4f}  B {results['B']['val/accuracy']:.4f}")
    print(f"eval_overhead: median B/A time of one evaluation, {args.clock} clock")
    print(f"RESULT eval_overhead={ratio[args.clock]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
