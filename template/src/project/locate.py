"""Which module overflowed: replay a run from a checkpoint, exactly, to its first overflow, and name the module.

    python -m PACKAGE.locate runs/default                  # from the checkpoint before the first skipped step
    python -m PACKAGE.locate runs/default/checkpoints/step_0000250 --step 262
    python -m PACKAGE.locate runs/default --max-steps 500   # replay at most this many steps (default 200)

A resume is bitwise exact, so the replay computes the same values as the run did: the checkpoint is loaded into
the model, optimizer, scaler, RNG and data position with train.py's own builders (one process), and each step runs
train.py's step with hooks on every module (amp/debug/locate.py): forward outputs, the gradients each module's backward
produced, and its parameters' gradients, checked against the precision's limit (65504 for fp16) as the backward
sees them, times the loss scale. It stops at the first step with a value past the limit or non-finite (or at
``--step N``) and prints that module and phase, the per-module headroom table, and the ``amp.fp32_modules`` line
that keeps the module in float32. Without ``--step`` the checkpoint is the newest one saved before the first
skipped step that ``metrics.jsonl`` records. ``amp.guard.locate=true`` runs it when the collapse guard trips.
Nothing is written to the run's out_dir. Bad input is one line and exit code 2.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import example
from .config import Config, ConfigError, from_dict
from .configparse import UsageError, UsageParser
from .steps import PACKAGE, build_optimizer, forever, train_step


def first_skip_interval(out_dir: Path) -> tuple[int, int] | None:
    """(last log tick without a skipped step, the tick that first counts one) from metrics.jsonl, or None."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    before = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or "amp/skipped_steps" not in r:
            continue
        if r["amp/skipped_steps"] > 0:
            return before, int(r.get("step", before))
        before = int(r.get("step", before))
    return None


def choose(path: Path, step: int | None) -> tuple[Path | None, Path, str]:
    """The checkpoint to replay from (None: the run's start, which is as exact), the checkpoint whose config and
    precision the replay takes, and why."""
    from .amp.checkpoint import CHECKPOINTS, META, check_complete, list_checkpoints, read_meta

    if (path / META).is_file():
        check_complete(path)
        return path, path, "as given"
    if not (path / CHECKPOINTS).is_dir():
        raise UsageError(f"{path}: neither a checkpoint (no {META}) nor an out_dir with {CHECKPOINTS}/")
    done = []
    for c in list_checkpoints(path):
        try:
            check_complete(c)
            done.append((int(read_meta(c).get("step", 0)), c))
        except Exception:  # noqa: BLE001 - an incomplete checkpoint is simply not a candidate
            continue
    if not done:
        raise UsageError(f"{path / CHECKPOINTS}: no complete checkpoint to replay from")
    if step is not None:
        before = [d for d in done if d[0] < step]
        if not before:
            raise UsageError(f"--step {step}: no checkpoint before it (the oldest kept is step {min(done)[0]})")
        return max(before)[1], max(before)[1], f"the newest before step {step}"
    skips = first_skip_interval(path)
    if skips is None:
        return max(done)[1], max(done)[1], "the newest (metrics.jsonl records no skipped step)"
    before = [d for d in done if d[0] <= skips[0]]
    if not before and skips[0] == 0:
        return None, max(done)[1], "the run's start: its first skipped step came before any checkpoint"
    if not before:
        return min(done)[1], min(done)[1], (f"the oldest kept (the first skipped step came between steps {skips[0]}"
                                            f" and {skips[1]}, before it)")
    return max(before)[1], max(before)[1], (f"the newest before the first skipped step (between steps {skips[0]} "
                                            f"and {skips[1]})")


def replay(ckpt: Path | None, source: Path, step: int | None, max_steps: int,
           say: Callable[[str], None] = print) -> int:
    """Resume ``ckpt`` (None: start afresh from the seed) in a scratch out_dir with the config and precision of
    ``source`` and step with the locator on; prints the report. Returns 0."""
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from .amp import AmpSession
    from .amp.checkpoint import read_meta
    from .amp.debug.locate import OverflowLocator, limit_for

    meta = read_meta(source)
    try:
        cfg: Config = from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise UsageError(f"{source}: its config cannot be read ({e})") from None
    switches = meta.get("precision_switches") or []  # after a guard fallback: the precision the run started in
    prec = switches[0]["from"] if switches and ckpt is None else (meta.get("precision") or {}).get("effective")
    start = int(read_meta(ckpt).get("step", 0)) if ckpt is not None else 0
    end = start + max_steps if step is None else step
    settings = replace(cfg.amp, precision=prec, guard=replace(cfg.amp.guard, action="warn"), log_every=10**9, keep=1,
                       checkpoint_every=0, live=False, audit="off", meters=False, trackers=[])
    with tempfile.TemporaryDirectory(prefix="locate-") as scratch, AmpSession(
        settings, scratch, probe=False, gradient_accumulation_steps=cfg.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    ) as amp:
        set_seed(cfg.seed)
        loader, _, _ = example.build_data(cfg, amp.accelerator)
        model = example.build_model(cfg)
        optimizer, scheduler = build_optimizer(cfg, model, amp.accelerator.num_processes)
        model, optimizer, loader, scheduler = amp.prepare(model, optimizer, loader, scheduler)
        amp.resume(str(ckpt) if ckpt is not None else "none")
        say(f"locate: replaying {ckpt or 'the run from its start'} (step {start}, {prec}) to step {end} at the "
            f"latest; limit {limit_for(prec):g}")
        batches = forever(amp, loader)
        scaler = amp.accelerator.scaler
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        with OverflowLocator(model, limit_for(prec), scale) as loc:
            found = None
            while amp.step < end and found is None:
                loc.next_step(amp.step + 1)
                train_step(amp, model, optimizer, scheduler, batches, cfg)
                found = loc.finding()
            say(loc.report(fix=lambda module: f"amp.fp32_modules=[{module}]"))
        if found is None:
            say(f"no overflow in steps {start + 1}-{amp.step}")
        amp.close(completed=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m PACKAGE.locate PATH [--step N] [--max-steps N]``; returns the exit code."""
    p = UsageParser(prog=f"python -m {PACKAGE}.locate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="an out_dir, or one checkpoint (out_dir/checkpoints/step_NNNNNNN)")
    p.add_argument("--step", type=int, help="replay to this step (from the newest checkpoint before it)")
    p.add_argument("--max-steps", type=int, default=200, help="steps to replay at most without --step (default 200)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        if args.max_steps < 1 or (args.step is not None and args.step < 1):
            raise UsageError("--step and --max-steps must be >= 1")
        path = Path(args.path)
        if not path.exists():
            raise UsageError(f"{path}: no such out_dir or checkpoint")
        ckpt, source, why = choose(path, args.step)
        print(f"locate: from {ckpt or 'the start'} ({why})")
        return replay(ckpt, source, args.step, args.max_steps)
    except (UsageError, example.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a checkpoint that does not verify or load: one line; anything else is a bug
        from .amp.checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
