"""The training step and what it needs (model, AdamW and its schedule, the session and run, evaluation, ``auto``'s
probe in a child): train.py, bench.py, locate and numerics import this module; it imports none of them."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import example
from .config import Config, to_yaml

PACKAGE = __package__ or "project"
# what a child process of a launched run must not inherit: it is a single process of its own
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")


class StoppedEarly(KeyboardInterrupt):
    """A stop signal while nothing of the run exists yet (auto timing its candidates), or in a scratch run."""


def _stop_early(signum: int, frame: Any) -> None:
    raise StoppedEarly(signal.Signals(signum).name)


@contextmanager
def signals_end_it() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`StoppedEarly` here (nothing to save); the handlers before are put back."""
    before = {}
    with suppress(ValueError):  # not the main thread: signals are not ours to take
        before = {sig: signal.signal(sig, _stop_early) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def build_model(cfg: Config) -> Any:
    """The example's model with ``amp.fp32_modules`` kept in float32, for the tools that build one without a session."""
    from .amp import precision

    model = example.build_model(cfg)
    if cfg.amp.fp32_modules:
        precision.keep_in_fp32(model, cfg.amp.fp32_modules)
    return model


def build_optimizer(cfg: Config, model: Any, num_processes: int) -> tuple[Any, Any]:
    """AdamW and a warm-up + cosine schedule in optimizer steps: a prepared scheduler steps once per process per step
    (Accelerate's convention; not on a step the GradScaler skipped), so its counter is divided by the processes."""
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
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def forever(amp: Any, loader: Any):
    """Batches across epochs until the run stops or spends its step budget (an empty epoch: the session's LoopError)."""
    while amp.stop is None and not (amp.max_steps is not None and amp.step >= amp.max_steps):
        yield from amp.batches(loader)


def train_step(amp: Any, model: Any, optimizer: Any, scheduler: Any, batches: Any, cfg: Config) -> Any:
    """One optimizer step: accumulate -> forward (autocast) -> fp32 loss -> backward -> clip -> step -> schedule;
    the last micro-batch's loss (a tensor: no device read). ``amp.stop`` then says whether the run stopped."""
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
    """Held-out metrics (``val/...``) from the example's per-batch sums, the forward under ``autocast()`` (default: the
    training precision's). ``poll("eval i/n")`` shows progress; when it says a stop arrived, the eval returns {}."""
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
    return {**{f"val/{k}": v for k, v in metric.compute().items()}, "val/time_s": time.perf_counter() - t0}


def session_for(cfg: Config, settings: Any, out_dir: str, **kwargs: Any) -> Any:
    """An AmpSession for ``cfg`` with ``settings``: its gradient accumulation and the seeded data order of a resume."""
    from accelerate.utils import DataLoaderConfiguration

    from .amp import AmpSession

    return AmpSession(settings, out_dir, gradient_accumulation_steps=cfg.train.grad_accum, **kwargs,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))


@contextmanager
def scratch_session(cfg: Config, precision: str | None) -> Iterator[Any]:
    """bench's and locate's: ``cfg`` in ``precision`` in a temporary out_dir; the guard only warns, nothing is kept."""
    settings = replace(cfg.amp, precision=precision, guard=replace(cfg.amp.guard, action="warn"), log_every=10**9,
                       keep=1, checkpoint_every=0, live=False, audit="off", meters=False, trackers=[])
    with tempfile.TemporaryDirectory(prefix="scratch-") as tmp, session_for(cfg, settings, tmp, probe=False) as amp:
        with signals_end_it():  # nothing of a scratch run is kept: a stop signal ends it, no state saved
            yield amp
        amp.close(completed=False)


def build_run(cfg: Config, amp: Any, resume: str = "none") -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, scheduler, batches): the seeded data, model and optimizer, prepared, ``resume`` loaded."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    loader, _, _ = example.build_data(cfg, amp.accelerator)
    model = example.build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, model, amp.accelerator.num_processes)
    model, optimizer, loader, scheduler = amp.prepare(model, optimizer, loader, scheduler)
    amp.resume(resume)
    model.train()
    return model, optimizer, scheduler, forever(amp, loader)


def child_env(drop: tuple[str, ...] = RANK_ENV) -> dict[str, str]:
    """This environment without ``drop``, with the package importable in the child as in this process."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


def auto_probe(cfg: Config) -> Any:
    """How ``amp.precision=auto`` times this model where the hardware cannot say (False under train.compile)."""
    if cfg.train.compile:
        return False
    from .amp.debug.autopick import Probe

    key = {"package": PACKAGE, "model": asdict(cfg.model), "data": asdict(cfg.data), "batch": cfg.train.batch_size,
           "fp32_modules": cfg.amp.fp32_modules, "fused_optimizer": cfg.train.fused_optimizer, "tf32": cfg.amp.tf32}
    return Probe(run=lambda candidates: run_probe(cfg, candidates), key=key)


def run_probe(cfg: Config, candidates: list[str]) -> dict[str, float]:
    """Seconds per optimizer step per candidate, timed in a fresh single process that the run's state never sees."""
    with signals_end_it(), tempfile.TemporaryDirectory(prefix="auto-") as folder:  # a signal: child and folder go
        config = Path(folder) / "config.yaml"
        config.write_text(to_yaml(replace(cfg, resume="none", out_dir=folder)))
        argv = [sys.executable, "-m", f"{PACKAGE}.bench", "--probe", ",".join(candidates), "--config", str(config)]
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, check=False, timeout=900)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"probe": '):
            return json.loads(line)["probe"]
    last = ([ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit code {proc.returncode}"])[-1]
    raise RuntimeError(last.strip())


def finite_checkpoint(out_dir: str) -> Path | None:
    """The newest complete checkpoint of ``out_dir`` whose weights are all finite: where a guard's fallback starts
    (the one the guard just saved may hold NaN weights, e.g. after a learning rate that blew them up)."""
    import torch
    from safetensors.torch import load_file

    from .amp.checkpoint import check_complete, list_checkpoints

    for ckpt in reversed(list_checkpoints(out_dir)):
        try:
            check_complete(ckpt)
            if all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values()):
                return ckpt
        except Exception:  # noqa: BLE001 - a damaged checkpoint is no place to continue from
            continue
    return None


def locate_after_guard(cfg: Config) -> None:
    """``amp.guard.locate``: ``python -m PACKAGE.locate OUT_DIR`` in a fresh process (this one holds Accelerate's)."""
    if cfg.amp.guard.locate:
        try:  # a stop signal ends the child with this process (subprocess.run kills it)
            with signals_end_it():
                subprocess.run([sys.executable, "-m", f"{PACKAGE}.locate", cfg.out_dir], env=child_env(), check=False)
        except StoppedEarly as e:
            print(f"locate: stopped by {e}", file=sys.stderr)
