"""The training step and what it needs, shared by train.py, bench.py and the debugger's commands (locate, numerics).

The model (with ``amp.fp32_modules`` kept in float32), AdamW and its schedule, one optimizer step, the held-out
evaluation, and ``auto``'s probe (which times this same step in a child process, ``python -m PACKAGE.bench
--probe``). train.py, bench.py and locate.py import this module; it imports none of them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import example
from .config import Config

PACKAGE = __package__ or "project"
# what a child process of a launched run must not inherit: it is a single process of its own
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")


def build_model(cfg: Config) -> Any:
    """The example's model, with ``amp.fp32_modules`` kept in float32 (the session does it too, idempotently: this
    is for the tools that build a model without one)."""
    from .amp import precision

    model = example.build_model(cfg)
    if cfg.amp.fp32_modules:
        precision.keep_in_fp32(model, cfg.amp.fp32_modules)
    return model


def build_optimizer(cfg: Config, model: Any, num_processes: int) -> tuple[Any, Any]:
    """AdamW and a warm-up + cosine schedule written in optimizer steps.

    A prepared scheduler steps once per process per optimizer step (Accelerate's convention), and not at all on a
    step the GradScaler skipped, so the schedule divides its counter by the number of processes.
    """
    import torch

    t = cfg.train
    fused = {"fused": True} if t.fused_optimizer else {}  # the session keeps skip detection right for fused
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), **fused)

    def lr_at(i: int) -> float:
        s = i // num_processes
        if s < t.warmup_steps:
            return (s + 1) / (t.warmup_steps + 1)
        frac = min(1.0, (s - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return (t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))) / t.lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def param_groups(model: Any, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings, convolutions) only; biases and norms are left alone."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def forever(amp: Any, loader: Any):
    """Batches across epochs from the resumed position on, until the run stops or its step budget is spent (an epoch
    without a batch is the session's one-line LoopError, not a spin)."""
    while amp.stop is None and not (amp.max_steps is not None and amp.step >= amp.max_steps):
        yield from amp.batches(loader)


def train_step(amp: Any, model: Any, optimizer: Any, scheduler: Any, batches: Any, cfg: Config) -> Any:
    """One optimizer step: accumulate -> forward (autocast) -> fp32 loss -> backward -> clip -> step -> schedule.
    Returns the last micro-batch's loss (a tensor: no device read); after it, ``amp.stop`` says whether the run
    stopped (a stop signal or the guard, the state saved)."""
    accelerator, t = amp.accelerator, cfg.train
    loss = None
    for _ in range(t.grad_accum):
        batch = next(batches)
        with accelerator.accumulate(model):
            loss = example.loss(model, batch)  # the prepared model autocasts; the loss is float32
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:  # unscales first in fp16; inf max_norm only measures
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()  # holds when the scaler skipped the step
            optimizer.zero_grad(set_to_none=True)
        amp.after_step(loss, grad_norm)  # no device read; at log ticks: console, metrics, guard, signals
        if accelerator.sync_gradients:  # Accelerate steps early at the end of an epoch: one step per call
            break
    return loss


def evaluate(model: Any, loader: Any, accelerator: Any, metric: Any, max_batches: int,
             poll: Any = None, autocast: Any = None) -> dict[str, float]:
    """Held-out metrics (``val/...``) from the example's per-batch sums; the forward runs under ``autocast()``
    (default: ``accelerator.autocast``, the training precision), the loss in float32.

    ``poll("eval i/n")`` shows the progress and says whether a stop signal arrived (``amp.poll_stop``): then the
    eval ends within a batch, with nothing returned.
    """
    import torch

    t0 = time.perf_counter()
    model.eval()
    rows: list[Any] | None = []
    total = min(max_batches, len(loader)) if max_batches else len(loader)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            if poll is not None and poll(f"eval {i + 1}/{total}"):
                rows = None
                break
            with (autocast or accelerator.autocast)():
                per_sample = example.eval_rows(model, batch)
            # gather per sample (it drops the samples Accelerate repeats to even out the last batch), sum per batch
            rows.append(accelerator.gather_for_metrics(per_sample.double()).sum(0))
    model.train()
    if poll is not None and rows is not None:
        poll(None)
    if metric is None or rows is None:  # not the main process, or stopped
        return {}
    sums = torch.stack(rows).tolist() if rows else []  # one transfer for the whole eval
    metric.add_batch(**{name: [r[j] for r in sums] for j, name in enumerate(example.EVAL_FIELDS)})
    out = {f"val/{k}": v for k, v in metric.compute().items()}
    out["val/time_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------
# work in a child process: auto's probe (bench.py --probe), the guard's locate (locate.py)


def child_env(drop: tuple[str, ...] = RANK_ENV) -> dict[str, str]:
    """This environment without ``drop``, with the package importable in the child as in this process."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


def auto_probe(cfg: Config) -> Any:
    """How ``amp.precision=auto`` times this model where the hardware cannot say (False: train.compile, whose first
    steps would time the compiler). The key: what the timing depends on besides the machine."""
    if cfg.train.compile:
        return False
    from .amp.debug.autopick import Probe

    key = {"package": PACKAGE, "model": asdict(cfg.model), "data": asdict(cfg.data), "batch": cfg.train.batch_size,
           "fp32_modules": cfg.amp.fp32_modules, "fused_optimizer": cfg.train.fused_optimizer, "tf32": cfg.amp.tf32}
    return Probe(run=lambda candidates: run_probe(cfg, candidates), key=key)


def run_probe(cfg: Config, candidates: list[str]) -> dict[str, float]:
    """Seconds per optimizer step for each candidate, timed in a fresh process: the run's model, optimizer, RNG,
    data position and allocator never see it. Under a launcher the child is a single process of its own."""
    import json

    from .config import to_yaml

    with tempfile.TemporaryDirectory(prefix="auto-") as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(to_yaml(replace(cfg, resume="none", out_dir=folder)))
        argv = [sys.executable, "-m", f"{PACKAGE}.bench", "--probe", ",".join(candidates), "--config", str(config)]
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, check=False, timeout=900)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"probe": '):
            return json.loads(line)["probe"]
    last = ([ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit code {proc.returncode}"])[-1]
    raise RuntimeError(last.strip())


def locate_after_guard(cfg: Config) -> None:
    """``amp.guard.locate``: when the collapse guard tripped, ``python -m PACKAGE.locate OUT_DIR`` in a process of its
    own (the training process still holds Accelerate's state)."""
    if cfg.amp.guard.locate:
        subprocess.run([sys.executable, "-m", f"{PACKAGE}.locate", cfg.out_dir], env=child_env(), check=False)
