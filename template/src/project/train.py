"""Train the byte-level language model with Accelerate mixed precision.

    python -m PACKAGE.train [--config configs/fp16.yaml] [key=value ...]
    accelerate launch -m PACKAGE.train amp.precision=bf16

Sections run in a fixed order: config, accelerator and precision, data, model, resume, loop, the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed

from . import __version__, data
from .amp import precision
from .amp.checkpoint import CheckpointError, CheckpointManager, Progress, StopSignal, find_resume, trim_log
from .amp.console import TrainConsole, summary_table
from .amp.distributed import any_rank, mean_over_ranks
from .amp.monitor import AmpMonitor
from .config import Config, ConfigError, flat, parse_args, to_dict, to_yaml
from .metrics import load_metric
from .model import ByteLM, lm_loss, param_groups


def run(cfg: Config, switch: dict | None = None) -> int | dict:
    """Train; returns the exit code, or a precision switch (dict) asked for by the collapse guard."""
    # ----------------------------------------------------------------------------
    # accelerator and precision: say what was asked, what runs, and why
    # No CUDA: run on the CPU, also under a multi-GPU launch config (gloo ranks, not N separate 1-process runs)
    state = PartialState(cpu=not torch.cuda.is_available())
    res = precision.resolve(cfg.amp.precision, state.device)
    scaler_kw = precision.scaler_kwargs(**asdict(cfg.amp.scaler))
    for name in cfg.log.trackers:
        if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("log.trackers: tensorboard is not installed (pip install tensorboard)")
    accelerator = Accelerator(
        **precision.accelerator_kwargs(res, scaler_kw),
        cpu=state.device.type == "cpu",
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=cfg.log.trackers or None,
        project_dir=cfg.out_dir,
        # a seeded sampler: the data order depends only on (seed, epoch), so resume is exact
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    precision.install_cpu_fp16_scaler(accelerator, scaler_kw)  # before prepare, or fp16 on CPU is fp32
    precision.set_tf32(cfg.amp.tf32, cfg.amp.cudnn_benchmark)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    console = TrainConsole(cfg.train.max_steps, live=cfg.log.live, enabled=main)
    say = console.log
    say(res.line())
    say(f"world_size={accelerator.num_processes} distributed_type={accelerator.distributed_type.value} "
        f"device={accelerator.device} scaler={type(accelerator.scaler).__name__ if accelerator.scaler else 'none'}")
    say("config:\n" + to_yaml(cfg).rstrip())

    # ----------------------------------------------------------------------------
    # data: real text that needs no download (the stdlib's sources unless data.files says otherwise)
    with accelerator.main_process_first():
        files = [] if cfg.data.hub_name else data.resolve_files(cfg.data.files, cfg.data.max_bytes)
        train_ds, val_ds = data.load_splits(files, cfg.data.hub_name, cfg.data.text_column, cfg.data.seq_len,
                                            cfg.data.val_fraction)
    train_loader = data.make_loader(train_ds, cfg.train.batch_size, True, cfg.seed, cfg.data.num_workers)
    val_loader = data.make_loader(val_ds, cfg.train.batch_size, False, cfg.seed, cfg.data.num_workers)
    say(f"data: {len(train_ds)} train / {len(val_ds)} val blocks of {cfg.data.seq_len + 1} bytes")

    # ----------------------------------------------------------------------------
    # model, optimizer, schedule
    model = ByteLM(cfg.data.seq_len, cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head, cfg.model.dropout)
    if cfg.amp.fp32_modules:
        try:
            say(f"fp32 modules: {', '.join(precision.keep_in_fp32(model, cfg.amp.fp32_modules))}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=(0.9, 0.95))
    # A prepared scheduler steps once per process per optimizer step (Accelerate's convention), and not at
    # all on a skipped step, so the schedule is written in optimizer steps: i // num_processes.
    t = cfg.train

    def lr_at(i: int) -> float:
        s = i // accelerator.num_processes
        if s < t.warmup_steps:
            return (s + 1) / (t.warmup_steps + 1)
        frac = min(1.0, (s - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return (t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))) / t.lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    monitor = AmpMonitor(accelerator.scaler, scale_fn=precision.engine_loss_scale(accelerator, model))
    progress = Progress()
    accelerator.register_for_checkpointing(progress, monitor)

    def meta() -> dict:
        return {"step": progress.step, "epoch": progress.epoch, "template_version": __version__,
                "precision": {"requested": res.requested, "effective": res.effective, "reason": res.reason},
                "scaler_kwargs": scaler_kw if res.uses_scaler else None, "precision_switches": monitor.switches,
                "torch": torch.__version__, "accelerate": version("accelerate"), "config": to_dict(cfg)}

    ckpt = CheckpointManager(accelerator, cfg.out_dir, cfg.checkpoint.keep, meta)

    # ----------------------------------------------------------------------------
    # resume: model, optimizer, scheduler, scaler, RNG, data position and AMP statistics
    path, notices = find_resume(cfg.out_dir, cfg.resume)
    if path is not None:
        notices += ckpt.load(path, res.effective, scaler_kw if res.uses_scaler else None)
    monitor.sync_scale()  # the scale in effect now, restored or fresh
    if switch is not None:  # recorded in the monitor: checkpoint metadata and the summary carry it
        monitor.switches.append(switch)
        notices.append(f"precision switch: {switch['from']} -> {switch['to']} at step {switch['step']} "
                       f"({switch['reason']})")
    for line in notices:
        say(line)
    if cfg.log.trackers:
        accelerator.init_trackers(Path(cfg.out_dir).name, config=flat(to_dict(cfg)))

    # ----------------------------------------------------------------------------
    # the loop
    stop = StopSignal()
    metrics_file = Path(cfg.out_dir) / "metrics.jsonl"
    if main:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and (n := trim_log(metrics_file, progress.step)):
            say(f"resume: dropped {n} metrics.jsonl records logged after step {progress.step}")
    tokens_per_batch = cfg.train.batch_size * cfg.data.seq_len * accelerator.num_processes
    grad_norm = None
    step = start = progress.step
    warned = None

    def log_record(record: dict) -> None:
        accelerator.log(record, step=step)
        if main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def batches():
        while True:
            loader = train_loader
            if progress.batch_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, progress.batch_in_epoch)
            loader.set_epoch(progress.epoch)
            for batch in loader:
                progress.batch_in_epoch += 1
                yield batch
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0

    def evaluate() -> dict:
        model.eval()
        metric = load_metric() if main else None
        with torch.no_grad():
            for i, (x, y) in enumerate(val_loader):
                if cfg.eval.batches and i >= cfg.eval.batches:
                    break
                with accelerator.autocast():
                    logits = model(x)
                # metrics in float32, outside autocast
                nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
                preds, refs, nll = accelerator.gather_for_metrics((logits.argmax(-1), y, nll))
                if main:
                    metric.add_batch(predictions=preds.flatten(), references=refs.flatten(), nll=nll.flatten().double())
        model.train()
        out = metric.compute() if main else {}
        return {f"val/{k}": v for k, v in out.items()}

    it = batches()
    model.train()
    console.start_clock(step, progress.samples_seen, progress.tokens_seen)
    with console:
        while True:
            last_step = step == cfg.train.max_steps
            tick = step > start and (last_step or step % cfg.log.every == 0)
            if tick:  # the only place the loop reads device values (one sync per interval)
                m = monitor.flush()
                m["train/lr"] = scheduler.get_last_lr()[0]
                m = mean_over_ranks(accelerator, m)
                log_record(m)
                console.update(step=step, samples=progress.samples_seen, tokens=progress.tokens_seen,
                               loss=m.get("train/loss"), lr=m["train/lr"], scale=monitor.scale, epoch=progress.epoch,
                               scale_trend=list(monitor.trend), skipped=monitor.skipped,
                               skip_rate=m["amp/skip_rate"], recent_skip_rate=monitor.recent_skip_rate,
                               consecutive_skips=monitor.consecutive_skips, grad_norm=monitor.last_grad_norm,
                               precision=res.effective, world_size=accelerator.num_processes,
                               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
                problem = monitor.check(cfg.amp.guard.min_scale, cfg.amp.guard.max_consecutive_skips)
                if cfg.amp.guard.action != "warn" and any_rank(accelerator, problem is not None):
                    problem = problem or "another process tripped the AMP guard"
                    say(monitor.diagnosis(problem, res.effective), style="red")
                    saved = ckpt.save(step)
                    if cfg.amp.guard.action == "fallback" and res.effective != "fp32":
                        native_bf16 = precision.resolve("auto", accelerator.device).effective == "bf16"
                        target = "bf16" if res.effective == "fp16" and native_bf16 else "fp32"
                        return {"step": step, "from": res.effective, "to": target, "reason": problem, "path": str(saved)}
                    say(f"stopped by the AMP guard; state saved to {saved}")
                    accelerator.end_training()
                    return 3
                if problem and problem != warned:
                    say(f"warning: {problem} (amp.guard.action=warn)", style="yellow")
                warned = problem
            if last_step or (cfg.eval.every and step > start and step % cfg.eval.every == 0):
                ev = evaluate()
                log_record(ev)
                say(" | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if step > start and (last_step or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
                say(f"checkpoint: {ckpt.save(step)}")
            if stop.requested(accelerator, tick) and not last_step:
                saved = ckpt.save(step)
                say(f"stopped by {stop.signame} at step {step}; state saved to {saved}. "
                    f"Resume with the same command (resume=auto) or resume={saved}")
                accelerator.end_training()
                return 0
            if last_step:
                break

            # one optimizer step: accumulate -> forward (autocast) -> fp32 loss -> backward -> clip -> step
            loss_sum = None
            for _ in range(cfg.train.grad_accum):
                x, y = next(it)
                with accelerator.accumulate(model):
                    loss = lm_loss(model(x), y)  # the prepared model autocasts; the loss is float32
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # unscales first in fp16; inf max_norm only measures
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf)
                    optimizer.step()
                    scheduler.step()  # holds when the scaler skipped the step
                    optimizer.zero_grad(set_to_none=True)
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            step += 1
            progress.step = step
            progress.samples_seen += cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
            progress.tokens_seen += tokens_per_batch * cfg.train.grad_accum
            monitor.record(step, loss_sum / cfg.train.grad_accum, grad_norm)

    # ----------------------------------------------------------------------------
    # the end: AMP summary
    summary = {"precision": res.effective, **monitor.summary(), "precision_switches": monitor.switches}
    if accelerator.num_processes > 1:  # the scaler sees all-reduced gradients: every rank skips the same steps
        skipped = accelerator.gather(torch.tensor([monitor.skipped], device=accelerator.device))
        summary["amp/skipped_steps_per_rank"] = skipped.tolist()
    if main:
        (Path(cfg.out_dir) / "amp_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        console.print_table(summary_table(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the config, train, and turn bad input into one line and exit code 2."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        switch = None
        while True:
            try:
                result = run(cfg, switch)
                if isinstance(result, int):
                    return result
                # the guard asked for another precision: continue from the checkpoint just saved, in this
                # process (the process group and data cache stay; Accelerate's precision state is rebuilt)
                switch = result
                cfg = replace(cfg, resume=switch["path"], amp=replace(cfg.amp, precision=switch["to"]))
            finally:
                # Accelerate keeps its precision in process-wide singletons; clearing them lets the next
                # run() (a fallback, or another main() call in the same process) choose its own
                AcceleratorState._reset_state(reset_partial_state=False)
                GradientState._reset_state()
    except (ConfigError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Skip interpreter teardown: DDP keeps gloo's worker threads alive past end_training(), and one that
        # releases a Python tensor while Python finalizes aborts the finished run (SIGABRT, "terminate called
        # without an active exception"). Files are closed, trackers finished and streams flushed by now.
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
