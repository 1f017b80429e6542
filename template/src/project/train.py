"""Train the example's model (``example/``) with Accelerate mixed precision: the loop, the same for any model.

    python -m PACKAGE.train [--config configs/fp16.yaml] [key=value ...]     (--help lists every key)
    accelerate launch -m PACKAGE.train amp.precision=bf16

Sections run in a fixed order: config, session (accelerator and precision), data, model, resume, loop, the end.
The AMP machinery lives in ``amp/`` (one AmpSession); the model, data, loss and metrics in ``example/``; this file
is the loop you read and change.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from typing import Any

from . import example
from .config import (
    Config,
    ConfigError,
    ConfigExit,
    check_trackers,
    guard_policy,
    parse_args,
    resume_check,
    to_dict,
    to_yaml,
)

# ----------------------------------------------------------------------------
# building blocks shared with bench.py: the model, the optimizer and its schedule (the data: example.build_data)


def build_model(cfg: Config) -> Any:
    """The example's model, with ``amp.fp32_modules`` kept in float32."""
    from .amp import precision

    model = example.build_model(cfg)
    if cfg.amp.fp32_modules:
        try:
            precision.keep_in_fp32(model, cfg.amp.fp32_modules)
        except ValueError as e:
            raise ConfigError(f"amp.fp32_modules: {e}") from None
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


def evaluate(model: Any, loader: Any, accelerator: Any, metric: Any, max_batches: int,
             show: Any = None, stop: Any = None, autocast: Any = None) -> dict[str, float]:
    """Held-out metrics (``val/...``) from the example's per-batch sums; the forward runs under ``autocast()``
    (default: ``accelerator.autocast``, the training precision), the loss in float32.

    ``show("eval i/n")`` reports progress (the live panel's bar on a terminal); ``stop()`` is asked before each
    batch (a stop signal mid-eval ends it within a batch, with nothing returned).
    """
    import torch

    t0 = time.perf_counter()
    model.eval()
    rows = []
    total = min(max_batches, len(loader)) if max_batches else len(loader)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            if stop is not None and stop():
                rows = None
                break
            if show is not None:
                show(f"eval {i + 1}/{total}")
            with (autocast or accelerator.autocast)():
                per_sample = example.eval_rows(model, batch)
            # gather per sample (it drops the samples Accelerate repeats to even out the last batch), sum per batch
            rows.append(accelerator.gather_for_metrics(per_sample.double()).sum(0))
    model.train()
    if show is not None:
        show(None)
    if metric is None or rows is None:  # not the main process, or stopped
        return {}
    sums = torch.stack(rows).tolist() if rows else []  # one transfer for the whole eval
    metric.add_batch(**{name: [r[j] for r in sums] for j, name in enumerate(example.EVAL_FIELDS)})
    out = {f"val/{k}": v for k, v in metric.compute().items()}
    out["val/time_s"] = time.perf_counter() - t0
    return out


def done_already(amp: Any, cfg: Config) -> str | None:
    """The one line to print when the checkpoint to resume is at or past train.max_steps (nothing to train); what a
    run killed after its last checkpoint did not write (final/, the summary) is written now."""
    from .amp.checkpoint import read_meta
    from .export import complete_run

    path, _ = amp.find_checkpoint(cfg.resume)
    step = read_meta(path).get("step", 0) if path is not None else 0
    if isinstance(step, int) and step >= cfg.train.max_steps:
        wrote = complete_run(path) if amp.is_main else []
        return (f"nothing to do: {path} is at step {step} and train.max_steps is {cfg.train.max_steps}; "
                "raise train.max_steps to train on" + "".join(f"; wrote {w}" for w in wrote))
    return None


def forever(amp: Any, loader: Any):
    """Batches across epochs, from the resumed position on; an epoch without a batch is an error, not a spin."""
    while not amp.should_stop:
        seen = 0
        for batch in amp.batches(loader):
            seen += 1
            yield batch
        if not seen and not amp.progress.batch_in_epoch and not amp.should_stop:
            raise example.DataError("data: an epoch of the training data gave no batch (check the data keys, "
                                    "train.batch_size and the number of processes)")


def train_step(amp: Any, model: Any, optimizer: Any, scheduler: Any, batches: Any, cfg: Config) -> Any:
    """One optimizer step (bench.py times this same function): accumulate -> forward (autocast) -> fp32 loss ->
    backward -> clip -> step -> schedule. Returns the last micro-batch's loss (a tensor: no device read); after it,
    ``amp.should_stop`` says whether the run stopped (a stop signal or the guard, the state saved)."""
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


# ----------------------------------------------------------------------------
# the run


def run(cfg: Config, switch: dict | None = None, notices: tuple[str, ...] = ()) -> int:
    """Train to ``train.max_steps``; returns the exit code (1: trained and saved, but the export failed). The
    guard's stop and fallback arrive as exceptions."""
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from .amp import AmpSession, precision
    from .bench import auto_probe
    from .export import export_after_training

    check_trackers(cfg.log.trackers, cfg.log.tracker_kwargs)
    t = cfg.train
    # ----------------------------------------------------------------------------
    # session: precision (requested, in effect, why), the Accelerator, scaler, lock, console
    with AmpSession(
        cfg.amp.precision, cfg.out_dir, scaler=asdict(cfg.amp.scaler), guard=guard_policy(cfg),
        log_every=cfg.log.every, checkpoint_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
        max_steps=t.max_steps, config=to_dict(cfg),
        live=cfg.log.live, rescale_schedule_on_world_size_change=True, gradient_accumulation_steps=t.grad_accum,
        log_with=cfg.log.trackers, run_name=cfg.log.run_name or None, tracker_kwargs=cfg.log.tracker_kwargs,
        tracker_config=to_dict(cfg), auto_probe=auto_probe(cfg) or False,  # auto: timed on this model (bench.py)
        audit=cfg.amp.audit, meters=cfg.amp.meters,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        **({"dynamo_backend": "inductor"} if t.compile else {}),
    ) as amp:
        accelerator = amp.accelerator
        done = done_already(amp, cfg)
        if done is not None:  # before data and model: a finished run answers at once
            amp.say(done)
            amp.close(completed=False)
            return 0
        precision.set_tf32(cfg.amp.tf32, cfg.amp.cudnn_benchmark)
        set_seed(cfg.seed)
        amp.say("config:\n" + to_yaml(cfg).rstrip())
        for line in notices:
            amp.say(line)

        # ----------------------------------------------------------------------------
        # data: the example's, offline (example/data.py)
        train_loader, val_loader, about = example.build_data(cfg, accelerator)
        amp.say(f"data: {about}")

        # ----------------------------------------------------------------------------
        # model, optimizer, schedule
        model = build_model(cfg)
        if cfg.amp.fp32_modules:
            amp.say(f"fp32 modules: {', '.join(n for n, m in model.named_modules() if getattr(m, '_amp_fp32', 0))}")
        optimizer, scheduler = build_optimizer(cfg, model, accelerator.num_processes)
        model, optimizer, train_loader, val_loader, scheduler = amp.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )

        # ----------------------------------------------------------------------------
        # resume: model, optimizer, scheduler, scaler, RNG, data position and AMP statistics
        amp.resume(cfg.resume, check=resume_check(cfg))
        if switch is not None:  # recorded in the monitor: checkpoint metadata and the summary carry it
            amp.monitor.switches.append(switch)
            amp.say(f"precision switch: {switch['from']} -> {switch['to']} at step {switch['step']} "
                    f"({switch['reason']})")
        start = amp.step
        metric = example.load_metric() if accelerator.is_main_process else None  # loaded once, fed per-batch sums

        # ----------------------------------------------------------------------------
        # the loop: evals, then one optimizer step; checkpoints and stops (signal, guard) are the session's to save
        batches = forever(amp, train_loader)
        model.train()
        code = 0
        while not amp.should_stop:
            step = amp.step
            last_step = step >= t.max_steps
            if last_step or (cfg.eval.every and step > start and step % cfg.eval.every == 0):
                fp32 = cfg.eval.precision == "fp32"  # float32 weights (bf16-true: the masters), autocast off
                net, autocast = (amp.full_precision(model), nullcontext) if fp32 else (model, None)
                ev = evaluate(net, val_loader, accelerator, metric, cfg.eval.batches, amp.console.activity,
                              amp.poll_stop, autocast)
                if amp.should_stop:  # a stop signal mid-eval: saved, nothing to report
                    break
                amp.log(ev)
                amp.say(" | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if last_step:  # out_dir/final/: weights and config.json, no training code needed (exit 1 if it fails)
                code = export_after_training(amp.save(), amp.say) if accelerator.is_main_process else 0
                break

            # one optimizer step: accumulate -> forward (autocast) -> fp32 loss -> backward -> clip -> step
            train_step(amp, model, optimizer, scheduler, batches, cfg)

        # the end: leaving the session saves if needed, prints and writes the AMP summary, ends training; after
        # the collapse guard it raises GuardStop or GuardFallback (handled in main)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the config, train, turn each failure into one line: exit 2 for bad input, 1 for a fault of
    the machine (full disk, out of memory, a lost process), 3 for the collapse guard, 130 for Ctrl-C twice."""
    notices: list[str] = []
    try:  # before torch is imported: a bad key is reported at once
        cfg = parse_args(sys.argv[1:] if argv is None else argv, notices)
    except ConfigExit as e:
        print(e.text)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .amp import faults
    from .amp.audit import AuditError
    from .amp.checkpoint import CheckpointError
    from .amp.guard import GuardFallback, GuardStop
    from .amp.position import LoopError
    from .amp.precision import PrecisionError
    from .amp.rundir import OutputDirError, RunLockedError
    from .config import GUARD_HINT
    from .locate import after_guard
    main_process = os.environ.get("RANK", "0") == "0"  # one hint, not one per process
    switch = None
    while True:
        try:
            return run(cfg, switch, tuple(notices))
        except GuardStop:
            if main_process:
                after_guard(cfg)  # amp.guard.locate: name the module that overflowed
                print(GUARD_HINT)
            return 3
        except GuardFallback as fb:  # go on from the checkpoint just saved, in this process
            if main_process:
                after_guard(cfg)
                print(f"AMP guard: continuing in {fb.to} from {fb.path}")
            switch, notices = fb.record(), []
            cfg = replace(cfg, resume=fb.path, amp=replace(cfg.amp, precision=fb.to))
        except (ConfigError, CheckpointError, example.DataError, RunLockedError, PrecisionError, LoopError,
                AuditError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OutputDirError as e:
            print(f"error: out_dir: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a second Ctrl-C: no save (a half-written checkpoint is removed)
            print(f"error: interrupted twice: stopped without saving; {cfg.out_dir}/checkpoints has the last "
                  "complete checkpoint", file=sys.stderr)
            return 130
        except (OSError, MemoryError, RuntimeError) as e:  # a fault of the machine: one line, exit 1
            if faults.describe(e) is None:
                raise
            print(f"error: {faults.describe(e)}", file=sys.stderr)
            return 1
        finally:  # Accelerate's process-wide state, cleared for the next run() (a fallback) in this process
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()


if __name__ == "__main__":
    from .amp.distributed import run_main

    run_main(main)  # with several processes: os._exit once exit handlers ran (amp/distributed.py says why)
