"""Numerics report: each module's error in bf16 and fp16 against a float32 shadow, and the fp32_modules that fix it.

``python -m PACKAGE.numerics [OUT_DIR|CHECKPOINT] [--precisions bf16,fp16] [key=value ...]`` (debugger.md)."""

from __future__ import annotations

import itertools
import signal
import sys
from pathlib import Path

from . import example
from .config import Config, ConfigError, from_dict, parse_args, to_dict
from .configparse import UsageError, UsageParser, set_key
from .steps import PACKAGE, build_model, build_optimizer


def _state(path: Path | None, overrides: list[str]) -> tuple[Config, dict | None, str]:
    """(config, float32 weights or None, where they came from)."""
    if path is None:
        return parse_args(overrides), None, "the model as the config builds it from its seed"
    from safetensors.torch import load_file

    from .amp.checkpoint import CheckpointError, find_resume, read_meta

    try:
        ckpt, notices = (path, []) if (path / "meta.json").is_file() else find_resume(path, "auto")
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    for line in notices:  # a damaged newest checkpoint: skipped, as train says
        print(line)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise UsageError(f"{path}: no checkpoint with model.safetensors to start from")
    try:
        cfg = from_dict(read_meta(ckpt).get("config") or {})
        for item in overrides:  # checked as the command line's, then validated as a whole
            key, _, value = item.partition("=")
            set_key(cfg, key.strip(), value, text=True)
        cfg = from_dict(to_dict(cfg))
    except CheckpointError as e:  # a hand-edited meta.json
        raise UsageError(str(e)) from None
    except ConfigError as e:
        raise UsageError(f"{ckpt}: {e}") from None
    try:
        return cfg, load_file(str(ckpt / "model.safetensors")), f"the weights of {ckpt}"
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise UsageError(f"{ckpt / 'model.safetensors'}: unreadable ({' '.join(str(e).split())[:120]})") from None


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog=f"python -m {PACKAGE}.numerics", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="a run's out_dir or one checkpoint (default: a fresh model)")
    p.add_argument("--batches", type=int, default=4, help="training batches to compare on (default 4)")
    p.add_argument("--precisions", default="bf16,fp16", help="comma-separated: bf16,fp16 (default both)")
    p.add_argument("--tolerance", type=float, default=16.0, help="error in rounding units above which a module is "
                   "flagged (default 16)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.d_model=64")
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends it as Ctrl-C does
    try:
        args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
        # an existing path is a path (a sweep's run_lr=2e-3 folder), key=value otherwise
        path = Path(args.path) if args.path and ("=" not in args.path or Path(args.path).exists()) else None
        overrides = ([args.path] if args.path and path is None else []) + args.overrides
        precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
        bad = [x for x in precisions if x not in ("bf16", "fp16")]
        if bad or not precisions:
            raise UsageError(f"--precisions: {bad[0] if bad else args.precisions!r} is not bf16 or fp16")
        if args.batches < 1 or not 0 < args.tolerance < float("inf"):  # nan too
            raise UsageError("--batches must be >= 1 and --tolerance a finite number > 0")
        if path is not None and not path.exists():
            raise UsageError(f"{path}: no such out_dir or checkpoint")
        cfg, weights, source = _state(path, overrides)
        return report(cfg, weights, source, precisions, args.batches, args.tolerance)
    except (UsageError, ConfigError, example.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("numerics: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, before)


def report(cfg: Config, weights: dict | None, source: str, precisions: list[str], k: int, tolerance: float) -> int:
    """Measure, suggest, measure again; print it all."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .amp.debug import numerics

    set_seed(cfg.seed)
    accelerator = Accelerator(cpu=True)
    loader, _, _ = example.build_data(cfg, accelerator)
    batches = list(itertools.islice(iter(loader), k))
    set_seed(cfg.seed)
    model = build_model(cfg)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # a model.* override the checkpoint's weights do not fit
            first = next((x.strip() for x in str(e).splitlines()[1:] if x.strip()), str(e))
            raise UsageError(f"{source}: do not fit the model the config builds: {first}") from None
    build = numerics.copy_of(model)
    print(f"numerics: {source}; {len(batches)} training batches; float32 against "
          f"{', '.join(precisions)} autocast on the CPU; tolerance {tolerance:g} rounding units")
    for prec in precisions:
        rounds = numerics.suggest(build, batches, example.loss, prec, "cpu", tolerance)
        first, last = rounds[0], rounds[-1]
        print(f"\n{prec} (rounding unit {numerics.UNIT[prec]:g}):")
        print("\n".join(numerics.table(first.errors, tolerance)))
        if not first.flagged:
            print(f"no module above {tolerance:g} units: nothing to keep in float32 for {prec}")
            continue
        gap0, gap1 = (numerics.loss_gap(build, lambda m: build_optimizer(cfg, m, 1)[0], batches, example.loss, prec,
                                        fp32_modules=kept) for kept in ((), last.fp32_modules))
        worst0 = first.errors[0]
        after = {e.name: e for e in last.errors}
        still = [e.name for e in last.errors if e.worst > tolerance and e.name not in last.fp32_modules]
        print(f"suggested: amp.fp32_modules=[{','.join(last.fp32_modules)}]")
        print(f"  {worst0.name}: {worst0.worst:.1f} -> {after.get(worst0.name, worst0).worst:.1f} units; worst module "
              f"now {last.errors[0].name if last.errors else '-'} at {last.errors[0].worst if last.errors else 0:.1f}"
              + (f"; still above: {', '.join(still)}" if still else ""))
        print(f"  {len(batches)}-step training loss gap to float32: {100 * gap0:.3f}% -> {100 * gap1:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
