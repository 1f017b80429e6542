"""Which module overflowed: replay a run from a checkpoint, exactly, to its first overflow, and name the module.

``python -m PACKAGE.locate OUT_DIR|CHECKPOINT [--step N] [--max-steps 200]``; nothing is written (debugger.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import example
from .config import Config, ConfigError, from_dict
from .configparse import UsageError, UsageParser
from .steps import PACKAGE, build_run, scratch_session, train_step


def _records(out_dir: Path) -> list[dict]:
    """metrics.jsonl's records whose step is a number (a damaged line or value is passed over)."""
    path, out = out_dir / "metrics.jsonl", []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            out.append(r)
    return out


def _check_end(step: int | None, saved: int, out_dir: Path) -> None:
    """``--step`` past the run's last step (its newest checkpoint, or a later log record) is refused in one line."""
    if step is not None and step > (last := max([saved, *(r["step"] for r in _records(out_dir))])):
        raise UsageError(f"--step {step}: the run's last step is {last}")


def first_skip_interval(out_dir: Path) -> tuple[int, int] | None:
    """(last log tick without a skipped step, the tick that first counts one) from metrics.jsonl, or None."""
    before = 0
    for r in _records(out_dir):
        skipped = r.get("amp/skipped_steps")
        if isinstance(skipped, (int, float)):
            if skipped > 0:
                return before, r["step"]
            before = r["step"]
    return None


def choose(path: Path, step: int | None) -> tuple[Path | None, Path, str]:
    """(the checkpoint to replay from, None for the run's start; the one whose config and precision it takes; why)."""
    from .amp.checkpoint import CHECKPOINTS, META, check_complete, list_checkpoints, read_meta

    if (path / META).is_file():
        check_complete(path)
        at = read_meta(path).get("step", 0)
        if step is not None and step <= at:
            raise UsageError(f"--step {step}: {path} is at step {at}, not before it (give a later step)")
        _check_end(step, at, path.parent.parent)
        return path, path, "as given"
    if not (path / CHECKPOINTS).is_dir():
        raise UsageError(f"{path}: neither a checkpoint (no {META}) nor an out_dir with {CHECKPOINTS}/")
    done = []
    for c in list_checkpoints(path):
        try:
            check_complete(c)
            done.append((read_meta(c).get("step", 0), c))
        except Exception:  # noqa: BLE001 - an incomplete checkpoint is simply not a candidate
            continue
    if not done:
        raise UsageError(f"{path / CHECKPOINTS}: no complete checkpoint to replay from")
    newest, oldest = max(done)[1], min(done)[1]
    _check_end(step, max(done)[0], path)
    if step is not None:
        before = [d for d in done if d[0] < step]
        if not before:
            raise UsageError(f"--step {step}: no checkpoint before it (the oldest kept is step {min(done)[0]})")
        return max(before)[1], max(before)[1], f"the newest before step {step}"
    skips = first_skip_interval(path)
    if skips is None:
        return newest, newest, "the newest (metrics.jsonl records no skipped step)"
    before, between = [d for d in done if d[0] <= skips[0]], f"between steps {skips[0]} and {skips[1]}"
    if not before and skips[0] == 0:
        return None, newest, "the run's start: its first skipped step came before any checkpoint"
    if not before:
        return oldest, oldest, f"the oldest kept (the first skipped step came {between}, before it)"
    return max(before)[1], max(before)[1], f"the newest before the first skipped step ({between})"


def replay(ckpt: Path | None, source: Path, step: int | None, max_steps: int) -> int:
    """Resume ``ckpt`` (None: the seed) with ``source``'s config and precision, step with the locator on, print it."""
    from .amp.checkpoint import read_meta
    from .amp.debug.locate import OverflowLocator, limit_for

    meta = read_meta(source)
    try:
        cfg: Config = from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise UsageError(f"{source}: its config cannot be read ({e})") from None
    switches = meta.get("precision_switches") or []  # after a guard fallback: the precision the run started in
    prec = switches[0]["from"] if switches and ckpt is None else (meta.get("precision") or {}).get("effective")
    start = read_meta(ckpt).get("step", 0) if ckpt is not None else 0
    end = start + max_steps if step is None else step
    with scratch_session(cfg, prec) as amp:
        model, optimizer, scheduler, batches = build_run(cfg, amp, str(ckpt) if ckpt is not None else "none")
        print(f"locate: replaying {ckpt or 'the run from its start'} (step {start}, {prec}) to step {end} at the "
              f"latest; limit {limit_for(prec):g}")
        scaler = amp.accelerator.scaler
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        with OverflowLocator(model, limit_for(prec), scale) as loc:
            found = None
            while amp.step < end and found is None:
                loc.next_step(amp.step + 1)
                train_step(amp, model, optimizer, scheduler, batches, cfg)
                found = loc.finding()
            print(loc.report(fix=lambda module: f"amp.fp32_modules=[{module}]"))
        if found is None:
            print(f"no overflow in steps {start + 1}-{amp.step}")
    return 0


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt as e:  # a scratch replay: nothing of it is kept, nothing to resume
        print(f"locate: interrupted{f' by {e}' if str(e) else ''}; nothing was written", file=sys.stderr)
        return 0 if str(e) == "SIGTERM" else 130
    except Exception as e:  # bad input, or a checkpoint that does not verify or load: one line; anything else is a bug
        from .amp import SettingsError
        from .amp.checkpoint import CheckpointError
        from .amp.precision import PrecisionError

        if not isinstance(e, (UsageError, example.DataError, CheckpointError, PrecisionError, SettingsError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
