"""What the generated training loop costs next to a bare Accelerate loop, per precision, side by side.

    python benchmarks/overhead.py            # several minutes on 2 CPU cores (fp16 is most of it)
    python benchmarks/overhead.py --quick    # about a minute

Two loops train the same model on the same data, in one process per precision:

    (A) bare Accelerate  Accelerator + prepare; for each batch: accumulate -> forward -> backward ->
                         clip_grad_norm_ -> optimizer.step -> scheduler.step -> zero_grad
    (B) generated loop   the same body, inside the template's AmpSession (the precision resolved and printed,
                         the run lock, checkpoint registration, amp.batches() counting samples and tokens,
                         amp.after_step() recording loss, grad norm and loss scale without a sync, and at every
                         amp.log_every steps one read, metrics.jsonl, the guard check and a console line; the
                         precision audit after the first step; the meters on each tick's step)
    (N) the same, meters off (amp.meters=false): B/N is what the meters cost

Both are built with train.py's builders (model, data, AdamW and its schedule, the same seed and clipping), so
they run the same math: the final losses of A and B are printed side by side to show it. The template is
imported from this checkout (template/src, package ``project``). Evaluation and checkpoint saves are left out
of both: each is a once-in-a-while cost that the loops would share. fp16 on a CPU: a bare Accelerate loop
runs ``mixed_precision="fp16"`` as plain fp32 there, so loop A gets the same CPU GradScaler as the session
(``precision.install_cpu_fp16_scaler``), or A and B would not be doing the same work.

The loops take optimizer steps in turn, A B B A A B B A ... (who goes first alternates), each step timed on
its own, so a change in machine load hits both alike. A round is ``--block`` steps of each loop (10: one log
tick of B per round); the ratio B/A of the round's sums is taken per round and the median over rounds is
reported. Steps are timed in process CPU time by default (--clock cpu): on a shared machine the wall clock
also counts the time other processes held the cores, which swamps a 1% difference; the wall-clock ratio is
printed beside it. The workers run torch on one thread by default (--threads 1): what the generated loop adds
is Python-side work per step, and on a busy 2-core machine two OpenMP threads spend most of their CPU time
waiting for each other (a control run of A against a second A scattered by +-10% with 2 threads, by 0.2% with
one). --threads 0 keeps torch's own choice. The last line is machine-readable:

    RESULT overhead_vs_accelerate=<geometric mean over the precisions of the median B/A step-time ratio>
           meters_cost=<the same for B/N: what the meters at log ticks cost>

It prints numbers and never fails on a slow machine: there is no threshold to pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from _common import TEMPLATE_SRC, cpu_line, table, template_env

ROW = "overhead-row: "
# the model and data of each mode (config keys of the template); the rest of the config is its default
MODES = {
    "quick": {"model.d_model": 64, "model.n_layer": 2, "model.n_head": 4, "data.seq_len": 64, "train.batch_size": 8,
              "data.max_bytes": 400_000},
    "full": {"model.d_model": 128, "model.n_layer": 2, "model.n_head": 4, "data.seq_len": 128,
             "train.batch_size": 16, "data.max_bytes": 1_500_000},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds (about a minute)")
    p.add_argument("--precisions", default="fp32,bf16,fp16", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--rounds", type=int, help="rounds of --block steps of each loop (default 30, quick 20)")
    p.add_argument("--block", type=int, default=10,
                   help="steps of each loop per round; a multiple of amp.log_every (10) gives every round the same ticks")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the clock of the RESULT line")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the workers (default 1; 0 = torch's own choice): see the docstring")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    args.rounds = args.rounds or (20 if args.quick else 30)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    for name in args.precisions:
        if name not in ("fp32", "bf16", "fp16"):
            p.error(f"--precisions: {name!r} is not one of fp32, bf16, fp16")
    if args.rounds < 1 or args.block < 1 or args.warmup < 0:
        p.error("--rounds and --block must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------
# the worker: both loops for one precision, in this process


def build_config(mode: str, out_dir: str, precision: str):
    from project.config import parse_args as config_args

    overrides = [f"{k}={v}" for k, v in MODES[mode].items()]
    return config_args([*overrides, f"amp.precision={precision}", f"out_dir={out_dir}", "amp.live=false",
                        "train.max_steps=100000"])


def forever_epochs(loader):
    """A plain loop over epochs, as a bare script writes it (set_epoch keeps the seeded order per epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Bare:
    """(A) A bare Accelerate loop on train.py's model, data and optimizer."""

    def __init__(self, cfg):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed
        from project.amp import precision
        from project.amp.precision import has_accelerator
        from project.example import build_data
        from project.steps import build_model, build_optimizer

        cpu = not has_accelerator()  # the device the session picks
        res = precision.resolve(cfg.amp.precision, "cpu" if cpu else "cuda")
        kw = precision.accelerator_kwargs(res, cfg.amp.scaler_kwargs)
        self.accelerator = Accelerator(
            cpu=cpu, gradient_accumulation_steps=cfg.train.grad_accum, **kw,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))
        scaler = precision.cpu_fp16_scaler(self.accelerator, cfg.amp.scaler_kwargs)  # else fp16 runs as fp32 here
        if scaler is not None:  # what the session's hooks do, before prepare
            self.accelerator.scaler, self.accelerator.native_amp = scaler, True
        set_seed(cfg.seed)
        train_loader, _, _ = build_data(cfg, self.accelerator)
        model = build_model(cfg)
        optimizer, scheduler = build_optimizer(cfg, model, 1)
        self.model, self.optimizer, loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, train_loader, scheduler)
        self.batches = forever_epochs(loader)
        self.cfg = cfg
        self.loss = None

    def run(self, n: int) -> None:
        from project.example import loss as example_loss

        acc, t = self.accelerator, self.cfg.train
        for _ in range(n * t.grad_accum):
            batch = next(self.batches)
            with acc.accumulate(self.model):
                loss = example_loss(self.model, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.loss = loss.detach()

    def close(self) -> None:
        self.accelerator.end_training()


class Generated:
    """(B) The generated loop: train.py's session set-up and loop body (eval and checkpoint saves left out); (N) the
    same with ``amp.meters=false``."""

    def __init__(self, cfg, meters: bool = True):
        from accelerate.utils import DataLoaderConfiguration, set_seed
        from project.amp import AmpSession
        from project.config import to_dict
        from project.example import build_data
        from project.steps import build_model, build_optimizer, forever

        t = cfg.train
        self.amp = AmpSession(  # as train.py builds it, from the config's amp section
            replace(cfg.amp, meters=meters), cfg.out_dir + ("" if meters else "-no-meters"), max_steps=t.max_steps,
            config=to_dict(cfg), probe=False, gradient_accumulation_steps=t.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        )
        set_seed(cfg.seed)
        train_loader, _, _ = build_data(cfg, self.amp.accelerator)
        model = build_model(cfg)
        optimizer, scheduler = build_optimizer(cfg, model, self.amp.accelerator.num_processes)
        self.model, self.optimizer, loader, self.scheduler = self.amp.prepare(model, optimizer, train_loader, scheduler)
        self.amp.resume("none")
        self.batches = forever(self.amp, loader)
        self.cfg = cfg
        self.loss = None

    def run(self, n: int) -> None:
        from project.example import loss as example_loss

        amp, t = self.amp, self.cfg.train
        accelerator = amp.accelerator
        for _ in range(n):
            for _ in range(t.grad_accum):
                batch = next(self.batches)
                with accelerator.accumulate(self.model):
                    loss = example_loss(self.model, batch)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                amp.after_step(loss, grad_norm)
            self.loss = loss.detach()

    def close(self) -> None:
        self.amp.close(completed=False)


def timed(loop) -> tuple[float, float]:
    """One optimizer step: (process CPU seconds, wall seconds), with a device sync at the end on a GPU."""
    import torch

    c0, w0 = time.process_time(), time.perf_counter()
    loop.run(1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.process_time() - c0, time.perf_counter() - w0


def worker(args: argparse.Namespace) -> dict:
    """Both loops, stepping in turn (A B, B A, A B, ...); per round of ``block`` steps, the B/A ratio of the sums."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    prec = args.worker
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        cfg = build_config(args.mode, os.path.join(tmp, "run"), prec)
        loops = {"A": Bare(cfg), "B": Generated(cfg), "N": Generated(cfg, meters=False)}
        for loop in loops.values():
            loop.run(args.warmup)
        rounds: list[dict[str, list[float]]] = []  # per round: summed (cpu, wall) seconds of each loop
        for r in range(args.rounds):
            sums = {name: [0.0, 0.0] for name in loops}
            for i in range(args.block):  # one B log tick per round: block is a multiple of amp.log_every
                k = r * args.block + i  # who goes first turns: ABN, BNA, NAB, then backwards
                order = "ABN"[k % 3:] + "ABN"[:k % 3]
                for name in (order if (k // 3) % 2 == 0 else order[::-1]):
                    cpu_s, wall_s = timed(loops[name])
                    sums[name][0] += cpu_s
                    sums[name][1] += wall_s
            rounds.append(sums)
        losses = {k: float(v.loss) for k, v in loops.items()}
        summary = loops["B"].amp.summary()
        for loop in loops.values():
            loop.close()
    out = {"precision": prec, "effective": loops["B"].amp.resolution.effective, "losses": losses,
           "skipped_B": summary["amp/skipped_steps"], "steps": args.warmup + args.rounds * args.block,
           "threads": torch.get_num_threads()}
    for i, clock in enumerate(("cpu", "wall")):
        ratios = [x["B"][i] / x["A"][i] for x in rounds]
        meters = [x["B"][i] / x["N"][i] for x in rounds]
        out[clock] = {"A_ms": 1e3 * statistics.median(x["A"][i] / args.block for x in rounds),
                      "B_ms": 1e3 * statistics.median(x["B"][i] / args.block for x in rounds),
                      "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "meters": statistics.median(meters)}
    return out


# ----------------------------------------------------------------------------
# the parent: one fresh process per precision, then the table


def run_worker(prec: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--worker", prec, "--rounds", str(args.rounds), "--block", str(args.block),
            "--warmup", str(args.warmup)] + (["--quick"] if args.quick else []) + (
            ["--threads", str(args.threads)])
    proc = subprocess.run(argv, env=template_env(), capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW):
            return json.loads(line[len(ROW):])
    raise SystemExit(f"the {prec} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(TEMPLATE_SRC))
        print(ROW + json.dumps(worker(args)), flush=True)
        return 0
    import accelerate
    import torch

    model = " ".join(f"{k}={v}" for k, v in MODES[args.mode].items())
    print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, python {platform.python_version()}, "
          f"torch threads in the workers {args.threads or torch.get_num_threads()}")
    print(cpu_line())
    print(f"mode {args.mode}: {model}; {args.rounds} rounds of {args.block} steps of each loop after "
          f"{args.warmup} warm-up steps, stepping in turn; amp.log_every=10 (B reads the device once per 10 steps)")
    rows, results = [], []
    for prec in args.precisions:
        t0 = time.perf_counter()
        r = run_worker(prec, args)
        results.append(r)
        c, w = r["cpu"], r["wall"]
        rows.append([prec, f"{c['A_ms']:.2f}", f"{c['B_ms']:.2f}", f"{c['ratio']:.4f}",
                     f"{c['ratio_min']:.3f}-{c['ratio_max']:.3f}", f"{w['ratio']:.4f}", f"{c['meters']:.4f}",
                     f"{r['losses']['A']:.6f} / {r['losses']['B']:.6f}", str(r["skipped_B"]),
                     f"{time.perf_counter() - t0:.0f}s"])
    print()
    print(table(["precision", "A ms/step", "B ms/step", "B/A cpu", "B/A range", "B/A wall", "B/N cpu", "final loss A / B",
                 "skipped", "took"], rows))
    ratios = [r[args.clock]["ratio"] for r in results]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(f"\nms/step and ratios: medians over rounds, {'process CPU' if args.clock == 'cpu' else 'wall'} time "
          "unless marked wall. A = bare Accelerate, B = the generated loop (AmpSession, its meters on), N = the "
          "same without its meters (amp.meters=false): B/N is what the meters cost.")
    meters = [r[args.clock]["meters"] for r in results]
    meters_geo = math.exp(sum(math.log(x) for x in meters) / len(meters))
    print(f"overhead_vs_accelerate: geometric mean of the median B/A ratios over {', '.join(args.precisions)}, "
          f"{args.clock} clock (target: at most 1.02 on a CPU)")
    print(f"RESULT overhead_vs_accelerate={geo:.4f} meters_cost={meters_geo:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
