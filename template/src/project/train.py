"""Train the example's model (``example/``) with Accelerate mixed precision: the loop, the same for any model.

    python -m PACKAGE.train [--config configs/fp16.yaml] [key=value ...]     (--help lists every key)
    accelerate launch -m PACKAGE.train amp.precision=bf16

Sections run in a fixed order: config, session (accelerator and precision), data, model, resume, loop, the end.
The AMP machinery lives in ``amp/`` (one AmpSession, built from the config's ``amp`` section); the model, data,
loss and metrics in ``example/``; the step and the evaluation in ``steps.py``; this file is the loop you read and
change.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import example
from .config import (
    Config,
    ConfigError,
    ConfigExit,
    check_trackers,
    guard_hint,
    parse_args,
    resume_check,
    to_dict,
    to_yaml,
)
from .steps import auto_probe, build_optimizer, evaluate, forever, locate_after_guard, session_for, train_step


def done_already(cfg: Config, is_main: bool) -> str | None:
    """The one line to print when the checkpoint to resume is at or past train.max_steps (nothing to train); what a
    run killed after its last checkpoint did not write (final/, the summary) is written now."""
    from .amp.checkpoint import find_resume, read_meta
    from .export import complete_run

    path, _ = find_resume(cfg.out_dir, cfg.resume)
    step = read_meta(path).get("step", 0) if path is not None else 0
    if isinstance(step, int) and step >= cfg.train.max_steps:
        wrote = complete_run(path) if is_main else []
        return (f"nothing to do: {path} is at step {step} and train.max_steps is {cfg.train.max_steps}; "
                "raise train.max_steps to train on" + "".join(f"; wrote {w}" for w in wrote))
    return None


# ----------------------------------------------------------------------------
# the run


def run(cfg: Config, notices: tuple[str, ...] = ()) -> tuple[int, Any]:
    """Train to ``train.max_steps``; returns (the exit code, the session's stop: None, a signal's or the guard's).
    The code is 1 when the run trained and saved but its export failed."""
    from accelerate.utils import set_seed

    from .amp.checkpoint import latest_checkpoint
    from .amp.console import fmt_duration
    from .export import export_after_training

    check_trackers(cfg.amp.trackers, cfg.amp.tracker_kwargs)
    t, began = cfg.train, time.monotonic()
    # ----------------------------------------------------------------------------
    # session: precision (requested, in effect, why), the Accelerator, scaler, lock, console; auto timed on this
    # model in a child process (steps.auto_probe)
    with session_for(cfg, cfg.amp, cfg.out_dir, max_steps=t.max_steps, config=to_dict(cfg), probe=auto_probe(cfg),
                     **({"dynamo_backend": "inductor"} if t.compile else {})) as amp:
        accelerator = amp.accelerator
        done = done_already(cfg, accelerator.is_main_process)
        if done is not None:  # before data and model: a finished run answers at once
            accelerator.print(done)
            amp.close(completed=False)
            return 0, None
        set_seed(cfg.seed)
        accelerator.print("config:\n" + to_yaml(cfg).rstrip())
        for line in notices:
            accelerator.print(line)

        # ----------------------------------------------------------------------------
        # data: the example's, offline (example/data.py)
        train_loader, val_loader, about = example.build_data(cfg, accelerator)
        accelerator.print(f"data: {about}")

        # ----------------------------------------------------------------------------
        # model, optimizer, schedule; prepare keeps amp.fp32_modules in float32
        model = example.build_model(cfg)
        optimizer, scheduler = build_optimizer(cfg, model, accelerator.num_processes)
        model, optimizer, train_loader, val_loader, scheduler = amp.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )

        # ----------------------------------------------------------------------------
        # resume: model, optimizer, scheduler, scaler, RNG, data position and AMP statistics
        amp.resume(cfg.resume, check=resume_check(cfg), rescale_schedule=True)
        start = amp.step
        metric = example.load_metric() if accelerator.is_main_process else None  # loaded once, fed per-batch sums

        # ----------------------------------------------------------------------------
        # the loop: evals, then one optimizer step; checkpoints and stops (signal, guard) are the session's to save
        batches = forever(amp, train_loader)
        model.train()
        while amp.stop is None:
            step = amp.step
            last_step = step >= t.max_steps
            if last_step or (cfg.eval.every and step > start and step % cfg.eval.every == 0):
                fp32 = cfg.eval.precision == "fp32"  # float32 weights (bf16-true: the masters), autocast off
                net, autocast = (amp.unwrap(model, full_precision=True), nullcontext) if fp32 else (model, None)
                ev = evaluate(net, val_loader, accelerator, metric, cfg.eval.batches, amp.poll_stop, autocast)
                if amp.stop is not None:  # a stop signal mid-eval: saved, nothing to report
                    break
                accelerator.log(ev, step=step)
                accelerator.print(" | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if last_step:
                break
            # one optimizer step: accumulate -> forward (autocast) -> fp32 loss -> backward -> clip -> step
            train_step(amp, model, optimizer, scheduler, batches, cfg)

        # ----------------------------------------------------------------------------
        # the end: the final checkpoint and the AMP summary; out_dir/final/ (weights and config.json) when finished
        code = amp.close()
        accelerator.print(f"time: {fmt_duration(time.monotonic() - began)} for steps {start} to {amp.step}")
    if amp.stop is None and accelerator.is_main_process:  # exit 1 if the export fails (the run is saved)
        code = export_after_training(latest_checkpoint(cfg.out_dir))
    return code, amp.stop


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the config, train, turn each failure into one line: exit 2 for bad input, 1 for a fault of
    the machine (full disk, out of memory, a lost process), 3 for the collapse guard, 130 for Ctrl-C twice. After
    the guard's fallback the run goes on once more, in the precision it names, from the checkpoint it saved."""
    notices: list[str] = []
    try:  # before torch is imported: a bad key is reported at once
        cfg = parse_args(sys.argv[1:] if argv is None else argv, notices)
    except ConfigExit as e:
        print(e.text)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .amp import distributed
    from .amp.checkpoint import read_meta
    from .steps import finite_checkpoint

    main_process = os.environ.get("RANK", "0") == "0"  # one hint, not one per process
    for attempt in range(2):
        try:
            code, stop = run(cfg, tuple(notices) if not attempt else ())
        except BaseException as e:  # noqa: BLE001 - each kind of failure is one line with its exit status
            return failure(e, cfg)
        finally:  # Accelerate's process-wide state, cleared for a next run in this process (the fallback's)
            distributed.reset_accelerate()
        if stop is None or stop.reason == "signal":
            if stop is not None and main_process:
                print(f"to resume: run the same command again (it continues from {stop.path})")
            return code
        if main_process:
            locate_after_guard(cfg)  # amp.guard.locate: name the module that overflowed
        fallback = stop.to is not None and not attempt  # once: a second trip ends the run
        start = finite_checkpoint(cfg.out_dir) if fallback else None
        if start is None:
            if main_process:
                if fallback:
                    print(f"AMP guard: no checkpoint with finite weights in {cfg.out_dir} to continue in {stop.to} from")
                print(guard_hint((read_meta(Path(stop.path)).get("precision") or {}).get("effective", "")))
            return stop.exit_code
        if main_process:
            print(f"AMP guard: continuing in {stop.to} from {start}")
        cfg = replace(cfg, resume=str(start), amp=replace(cfg.amp, precision=stop.to))
    return 3


def failure(e: BaseException, cfg: Config) -> int:
    """One line for a failure, and its exit status; a bug (anything else) keeps its traceback."""
    from . import faults
    from .amp import LoopError, OutputDirError, RunLockedError, SettingsError
    from .amp.checkpoint import CheckpointError
    from .amp.debug.audit import AuditError
    from .amp.precision import PrecisionError
    from .steps import StoppedEarly

    if isinstance(e, SettingsError):
        print(f"error: amp.{e}", file=sys.stderr)
        return 2
    if isinstance(e, (ConfigError, CheckpointError, example.DataError, RunLockedError, PrecisionError, LoopError,
                      AuditError)):
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, OutputDirError):
        print(f"error: out_dir: {e}", file=sys.stderr)
        return 2
    if isinstance(e, StoppedEarly):  # while auto timed its candidates: no run exists yet
        print(f"stopped by {e} before the first step: nothing to save")
        return 0
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C: no save (a half-written checkpoint is removed)
        from .amp.checkpoint import list_checkpoints

        kept = f"{cfg.out_dir}/checkpoints has the last complete one" if list_checkpoints(cfg.out_dir) else "none yet"
        print(f"error: interrupted twice: stopped without saving a checkpoint; {kept}", file=sys.stderr)
        return 130
    if isinstance(e, (OSError, MemoryError, RuntimeError)) and faults.describe(e) is not None:
        print(f"error: {faults.describe(e)}", file=sys.stderr)  # a fault of the machine: one line, exit 1
        return 1
    raise e


if __name__ == "__main__":
    from .amp.distributed import run_main

    run_main(main)  # with several processes: os._exit once exit handlers ran (amp/distributed.py says why)
