"""What the AMP monitor and the console cost per training step, next to a bare Accelerate loop.

    python benchmarks/amp_overhead.py            # about 1-2 minutes on 2 CPU cores
    python benchmarks/amp_overhead.py --quick    # about 20 seconds

The same ByteLM training step (the template's model, imported from template/src) runs in three variants:

    (a) bare      forward (autocast) -> fp32 loss -> backward -> clip_grad_norm_ -> step -> zero_grad
    (b) +monitor  (a) + AmpMonitor.record(step, loss, grad_norm) every step, flush() and check() at log ticks
    (c) +console  (b) + TrainConsole.update(...) at log ticks, to a non-terminal console: plain lines
                  into a StringIO, as in CI or behind | tee

for fp32, bf16 and fp16 (fp16 on CPU through precision.install_cpu_fp16_scaler, a real GradScaler). Blocks of
steps are interleaved, a b c / b c a / c a b ..., so a change in machine load hits every variant alike; the
table gives the median ms/step per variant and the ratios (b)/(a), (c)/(a): the median over rounds of the
ratio within a round, so that a slow round does not count against one variant only. Steps are timed in
process CPU time by default (--clock cpu): on a shared machine the wall clock also counts the time other
processes held the cores, which swamps a 1% difference. A second table times record(), flush() and
update() alone, in microseconds. It prints numbers and never fails on a slow machine: there is no threshold
to pass. Offline: the batches are random bytes.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from rich.console import Console

# the template's package, unrendered: template/src/project
TEMPLATE_SRC = Path(__file__).resolve().parents[1] / "template" / "src"
sys.path.insert(0, str(TEMPLATE_SRC))

from project.amp import precision  # noqa: E402
from project.amp.console import TrainConsole  # noqa: E402
from project.amp.monitor import AmpMonitor  # noqa: E402
from project.model import ByteLM, lm_loss  # noqa: E402

VARIANTS = ("a", "b", "c")
NAMES = {"a": "(a) bare", "b": "(b) +monitor", "c": "(c) +console"}
# the template's amp.scaler defaults
SCALER = precision.scaler_kwargs(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=2000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (about 20 s)")
    p.add_argument("--precisions", default="fp32,bf16,fp16", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument("--reps", type=int, help="timed blocks (rounds) per variant (default 15, quick 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first block")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between flush()/update(), a log tick (the template's log.every default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="time steps in process CPU time (steady on a shared machine) or wall-clock time")
    p.add_argument("--d-model", type=int, help="model width (default 64, quick 32)")
    p.add_argument("--n-layer", type=int, help="transformer blocks (default 2, quick 1)")
    p.add_argument("--seq-len", type=int, help="bytes per sequence (default 64, quick 32)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 8, quick 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the overhead measured is Python-side, and one thread is "
                        "steadier on a shared machine)")
    args = p.parse_args(argv)
    quick = {"reps": 30, "d_model": 32, "n_layer": 1, "seq_len": 32, "batch_size": 4}
    full = {"reps": 15, "d_model": 64, "n_layer": 2, "seq_len": 64, "batch_size": 8}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    for name in args.precisions:
        if name not in ("fp32", "bf16", "fp16"):
            p.error(f"--precisions: {name!r} is not one of fp32, bf16, fp16")
    return args


# ----------------------------------------------------------------------------
# one precision: an accelerator, a model, and the three variants of the loop


class Loop:
    """A prepared ByteLM with AdamW on the CPU under one precision; ``step()`` is one optimizer step."""

    def __init__(self, name: str, args: argparse.Namespace):
        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per precision
        GradientState._reset_state()
        self.res = precision.resolve(name, "cpu")
        self.accelerator = Accelerator(cpu=True, **precision.accelerator_kwargs(self.res, SCALER))
        precision.install_cpu_fp16_scaler(self.accelerator, SCALER)  # before prepare
        torch.manual_seed(0)
        model = ByteLM(args.seq_len, args.d_model, args.n_layer, n_head=max(1, args.d_model // 16))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.model, self.opt = self.accelerator.prepare(model, opt)
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (16, args.batch_size, args.seq_len + 1), generator=g)
        self.batches = [(b[:, :-1], b[:, 1:]) for b in data]
        self.i = 0
        self.batch_size, self.tokens_per_step = args.batch_size, args.batch_size * args.seq_len

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = lm_loss(self.model(x), y)  # the prepared model autocasts; the loss is float32
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)  # unscales first in fp16
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm


class Variant:
    """One variant's monitor, console and step counter; they persist across its timed blocks."""

    def __init__(self, kind: str, loop: Loop, args: argparse.Namespace):
        self.kind, self.loop, self.log_every = kind, loop, args.log_every
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter
        self.monitor = AmpMonitor(loop.accelerator.scaler)
        self.out = io.StringIO()
        total = args.warmup + args.steps * args.reps
        self.console = TrainConsole(total, live=True, console=Console(file=self.out, width=120))
        assert not self.console.use_live  # a StringIO is no terminal: plain lines, as in CI or | tee
        self.step = 0
        self.times: list[float] = []

    def run(self, n: int) -> float:
        """``n`` optimizer steps; returns seconds per step."""
        loop, monitor = self.loop, self.monitor
        t0 = self.clock()
        for _ in range(n):
            loss, grad_norm = loop.step()
            self.step += 1
            if self.kind == "a":
                continue
            monitor.record(self.step, loss, grad_norm)
            if self.step % self.log_every:
                continue
            m = monitor.flush()  # the one read of the interval
            monitor.check(min_scale=2.0**-14, max_consecutive_skips=25)
            if self.kind == "c":
                self.console.update(
                    step=self.step, samples=self.step * loop.batch_size,
                    tokens=self.step * loop.tokens_per_step,
                    loss=m.get("train/loss"), lr=loop.opt.param_groups[0]["lr"], scale=monitor.scale,
                    scale_trend=list(monitor.trend), skipped=monitor.skipped, skip_rate=m["amp/skip_rate"],
                    recent_skip_rate=monitor.recent_skip_rate, consecutive_skips=monitor.consecutive_skips,
                    grad_norm=monitor.last_grad_norm, precision=loop.res.effective, world_size=1,
                )
        return (self.clock() - t0) / n


def bench_precision(name: str, args: argparse.Namespace) -> dict:
    loop = Loop(name, args)
    variants = {k: Variant(k, loop, args) for k in VARIANTS}
    for v in variants.values():
        v.run(args.warmup)
    for rep in range(args.reps):
        order = VARIANTS[rep % 3:] + VARIANTS[: rep % 3]  # rotate who goes first
        for k in order:
            variants[k].times.append(variants[k].run(args.steps))
    med = {k: statistics.median(v.times) for k, v in variants.items()}
    a = variants["a"].times
    ratio = {k: statistics.median(t / t_a for t, t_a in zip(variants[k].times, a, strict=True)) for k in "bc"}
    spread = {k: (min(v.times), max(v.times)) for k, v in variants.items()}
    lines = variants["c"].out.getvalue().splitlines()
    return {"name": name, "line": loop.res.line(), "median": med, "spread": spread, "ratio": ratio,
            "skipped": variants["b"].monitor.skipped, "steps": variants["b"].step,
            "console_line": lines[-1] if lines else "", "parts": bench_parts(loop, args)}


def bench_parts(loop: Loop, args: argparse.Namespace, n: int = 2000) -> dict[str, float]:
    """record(), flush() of one interval and update() alone, in microseconds per call."""
    loss, grad_norm = loop.step()
    monitor = AmpMonitor(loop.accelerator.scaler)
    t0 = time.perf_counter()
    for i in range(n):
        monitor.record(i + 1, loss, grad_norm)
    record_us = (time.perf_counter() - t0) / n * 1e6
    monitor.flush()
    flushes = max(1, n // (10 * args.log_every))
    t_flush = 0.0
    for j in range(flushes):
        for i in range(args.log_every):
            monitor.record(j * args.log_every + i + 1, loss, grad_norm)
        t0 = time.perf_counter()
        monitor.flush()
        t_flush += time.perf_counter() - t0
    console = TrainConsole(10**6, live=True, console=Console(file=io.StringIO(), width=120))
    t0 = time.perf_counter()
    for step in range(1, 201):
        console.update(step=step, samples=step, tokens=step * 256, loss=2.0, lr=1e-3, scale=monitor.scale,
                       scale_trend=list(monitor.trend), skipped=monitor.skipped, grad_norm=1.0,
                       precision=loop.res.effective)
    update_us = (time.perf_counter() - t0) / 200 * 1e6
    return {"record": record_us, "flush": t_flush / flushes * 1e6, "update": update_us}


# ----------------------------------------------------------------------------
# report


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import accelerate

    print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, "
          f"python {platform.python_version()}")
    print(f"{cpu_name()}; torch threads {torch.get_num_threads()}; bf16 feature: "
          f"{precision.cpu_bf16_feature() or 'none'}")
    print(f"ByteLM d_model={args.d_model} n_layer={args.n_layer} seq_len={args.seq_len} "
          f"batch={args.batch_size}; {args.reps} interleaved blocks x {args.steps} steps per variant "
          f"(+{args.warmup} warm-up); log tick every {args.log_every} steps")
    started = time.perf_counter()
    results = []
    for name in args.precisions:
        r = bench_precision(name, args)
        results.append(r)
        print(f"  {r['line']}: done in {time.perf_counter() - started:.0f}s; "
              f"steps skipped in (b): {r['skipped']}/{r['steps']}; last console line: {r['console_line']}",
              flush=True)

    print(f"\nmedian ms per optimizer step, {args.clock} time (min-max over rounds); "
          f"ratios: the median over rounds of the ratio within a round")
    rows = []
    for r in results:
        med, spread = r["median"], r["spread"]
        cells = [f"{med[k] * 1e3:.2f} ({spread[k][0] * 1e3:.1f}-{spread[k][1] * 1e3:.1f})" for k in VARIANTS]
        rows.append([r["name"], *cells, f"{r['ratio']['b']:.3f}", f"{r['ratio']['c']:.3f}"])
    print(table(["precision", *(NAMES[k] for k in VARIANTS), "(b)/(a)", "(c)/(a)"], rows))

    print(f"\nthe parts alone, microseconds per call (flush: one interval of {args.log_every} records)")
    rows = []
    for r in results:
        p, step_us = r["parts"], r["median"]["a"] * 1e6
        per_step = p["record"] + (p["flush"] + p["update"]) / args.log_every
        rows.append([r["name"], f"{p['record']:.1f}", f"{p['flush']:.1f}", f"{p['update']:.1f}",
                     f"{per_step:.1f}", f"{100 * per_step / step_us:.2f}%"])
    print(table(["precision", "record()", "flush()", "update()", "per step", "of (a)"], rows))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0 if all(math.isfinite(r["median"]["a"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
