"""Export a training checkpoint as a model anyone can load: ``model.safetensors``, ``config.json``, ``README.md``."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import example
from .amp.checkpoint import CHECKPOINTS, CheckpointError, check_complete, find_resume, read_meta, replace_dir
from .configparse import UsageError, UsageParser
from .faults import write_status

PACKAGE = __package__  # the package name also when run as `python -m PACKAGE.export` (__name__ is __main__)
WEIGHTS = "model.safetensors"
DEFAULT_RUN = "runs/default"  # the config's default out_dir
EXPORT_FILES = {"config.json", WEIGHTS, "README.md"}  # what an export holds; only these may be replaced


class ExportError(ValueError):
    """A checkpoint or destination that cannot be used; the message is one line naming the path."""


def find_checkpoint(path: str | Path, notices: list[str] | None = None) -> Path:
    """A checkpoint as given, or a run directory's newest complete one; ``notices`` gets what resume=auto says."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint or run directory")
    if (path / "meta.json").exists():
        return path
    if not (path / CHECKPOINTS).is_dir():
        raise ExportError(f"{path}: neither a checkpoint (no meta.json) nor a run directory (no {CHECKPOINTS}/)")
    found, said = find_resume(path, "auto")  # resume=auto's rule, and what it says
    if notices is not None:
        notices += said
    if found is None:
        raise ExportError(f"{path / CHECKPOINTS}: no complete checkpoint")
    return found


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any], Path]:
    """(model in eval mode, meta.json, checkpoint directory) of a checkpoint or a run's newest one, or ExportError."""
    path = find_checkpoint(path)
    weights = path / WEIGHTS
    try:
        meta = read_meta(path)  # a JSON object, or CheckpointError
        if not weights.is_file():
            others = sorted(p.name for p in path.iterdir() if p.name.startswith("pytorch_model"))
            hint = (f" (it holds {', '.join(others)}: save or merge the weights as safetensors, "
                    "e.g. `accelerate merge-weights`)") if others else ""
            raise ExportError(f"{path}: no {WEIGHTS}{hint}")
        check_complete(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = meta.get("config")  # the resolved training config: the model's constructor arguments
    try:
        args = example.model_args(config if isinstance(config, dict) else {})
    except ValueError as e:
        raise ExportError(f"{path}: meta.json {e}") from None
    model = example.model_class()(**args)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{weights}: unreadable ({e})") from None
    expected = model.state_dict()
    problems = [f"missing {k}" for k in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - expected.keys())]
    problems += [f"{k} is {tuple(state[k].shape)}, config wants {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ExportError(f"{weights}: weights do not fit the config in meta.json ({'; '.join(problems[:3])}{more})")
    model.load_state_dict(state)
    return model.to(device).eval(), meta, path


def _val_loss(meta: dict[str, Any], ckpt: Path) -> float | None:
    """val/loss at the checkpoint: the last one the run's metrics.jsonl holds up to its step (meta.json has none)."""
    log = ckpt.parent.parent / "metrics.jsonl"
    step, found = meta.get("step"), None
    if not isinstance(step, int) or not log.is_file():
        return None
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "val/loss" in rec and rec.get("step", math.inf) <= step:
            found = float(rec["val/loss"])
    return found


def model_card(model: Any, meta: dict[str, Any], ckpt: Path) -> str:
    """The README.md of an export: what the model is (the example's rows), how it was trained, how to load it."""
    n_params = sum(p.numel() for p in model.parameters())
    prec = meta.get("precision") or {}
    effective, requested = prec.get("effective", "unknown"), prec.get("requested")
    trained_in = effective if requested in (None, effective) else f"{effective} (requested {requested})"
    if switches := meta.get("precision_switches"):
        trained_in += ", switched " + ", ".join(f"{s.get('from')} -> {s.get('to')} at step {s.get('step')}"
                                                for s in switches)
    about, use = example.card(model, PACKAGE)
    rows = [*about[:1], ("parameters", f"{n_params:,}"), *about[1:], ("trained in", trained_in),
            ("optimizer steps", str(meta.get("step", "unknown")))]
    if (val := _val_loss(meta, ckpt)) is not None:
        rows.append(("val loss", example.loss_unit(val)))
    rows.append(("from checkpoint", ckpt.name))
    tags = "".join(f"- {t}\n" for t in type(model)._hub_mixin_info.model_card_data.tags or [])
    table = "".join(f"| {k} | {v} |\n" for k, v in rows)
    return f"""---
tags:
{tags}---

# {example.TITLE}

A model trained with `{PACKAGE}` (HuggingFace Accelerate, mixed precision).

| | |
| --- | --- |
{table}
## Use

{use}
"""


def export(ckpt_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the model of a checkpoint or run directory whole (beside ``out_dir``, then renamed) to ``out_dir`` (default
    ``final/`` beside ``checkpoints/``); only an export is replaced (else ExportError). Main process only."""
    model, meta, ckpt = load_checkpoint(ckpt_dir)
    dest = Path(out_dir) if out_dir is not None else ckpt.resolve().parents[1] / "final"
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest}: exists and is not a directory; pass another --out")
    foreign = sorted(p.name for p in dest.iterdir() if p.name not in EXPORT_FILES) if dest.is_dir() else []
    if foreign:
        raise ExportError(f"{dest}: exists and is not an exported model (holds {', '.join(foreign[:3])}); "
                          "pass another --out")
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # model.safetensors + config.json (and the mixin's generic card, replaced next)
    (tmp / "README.md").write_text(model_card(model, meta, ckpt))
    # safetensors creates its file owner-only (0600); an export is for sharing: the umask's mode, as the card has
    os.chmod(tmp / WEIGHTS, (tmp / "README.md").stat().st_mode & 0o777)
    replace_dir(tmp, dest)
    return dest


def export_after_training(ckpt: Path) -> int:
    """Export a finished run's last checkpoint to ``final/``: 0, or 1 after a warning that says how to export later."""
    try:
        print(f"model: {export(ckpt)} ({example.TITLE}.from_pretrained, python -m {PACKAGE}.sample)")
        return 0
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        final = ckpt.resolve().parents[1] / "final"
        print(f"warning: no export to {final} ({first}); the checkpoint {ckpt} has the weights: "
              f"python -m {PACKAGE}.export {ckpt}")
        print(f"error: trained and saved, but the export to {final} failed ({first})", file=sys.stderr)
        return 1


def complete_run(ckpt: Path) -> list[str]:
    """Write the ``final/`` and ``amp_summary.json`` a run killed after its last checkpoint did not; their paths."""
    from .amp.monitor import AmpMonitor
    from .amp.session import SUMMARY

    run_dir, wrote = Path(ckpt).resolve().parents[1], []
    if not (run_dir / "final" / WEIGHTS).is_file():
        wrote.append(str(export(ckpt)))
    state_file = Path(ckpt) / "amp_state_0.pt"
    if not (run_dir / SUMMARY).is_file() and state_file.is_file():
        monitor = AmpMonitor()
        monitor.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=False)["monitor"])
        precision = (read_meta(ckpt).get("precision") or {}).get("effective")
        summary = {"precision": precision, **monitor.summary(), "precision_switches": monitor.switches}
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        wrote.append(str(run_dir / SUMMARY))
    return wrote


def _resolve(path: Path, notices: list[str] | None = None) -> Path:
    """An export or checkpoint as given; for a run's out_dir, its newest complete checkpoint, else its final/."""
    if (path / "config.json").is_file() or (path / "meta.json").exists():
        return path
    final = path / "final"
    if (path / CHECKPOINTS).is_dir():
        try:
            return find_checkpoint(path, notices)
        except ExportError:
            if not (final / "config.json").is_file():
                raise
    return final if (final / "config.json").is_file() else path  # else load_checkpoint names what is wrong


def load_model(path: str | Path, device: str | torch.device = "cpu",
               notices: list[str] | None = None) -> tuple[Any, str]:
    """The model at ``path`` (export, checkpoint or out_dir) in eval mode and a line saying which weights, for sample.py
    and your scripts; ``notices`` receives why a newer checkpoint was skipped, as training says it."""
    path = _resolve(Path(path), notices)
    if (path / "config.json").is_file():
        if not (path / WEIGHTS).is_file():
            raise ExportError(f"{path}: no {WEIGHTS} beside config.json")
        try:
            model = example.model_class().from_pretrained(str(path), map_location=str(device))
        except (TypeError, ValueError, AttributeError, LookupError, RuntimeError, OSError, SafetensorError) as e:
            raise ExportError(f"{path}: not a loadable {example.TITLE} export ({str(e).splitlines()[0]})") from None
        return model, f"weights from {path} (exported model)"
    model, meta, ckpt = load_checkpoint(path, device)
    prec = (meta.get("precision") or {}).get("effective", "?")
    return model, f"weights from {ckpt} (step {meta.get('step', '?')}, trained in {prec})"


def device_arg(name: str) -> torch.device:
    """A ``--device`` value that works on this machine, or ExportError naming it."""
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # unknown type, or no such device on this machine
        raise ExportError(f"--device {name}: not usable here ({str(e).splitlines()[0]})") from None
    return device


def main(argv: list[str] | None = None) -> int:
    parser = UsageParser(prog=f"python -m {PACKAGE}.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", nargs="?", default=DEFAULT_RUN, help="a checkpoint directory (out_dir/checkpoints/"
                        f"step_NNNNNNN) or a run's out_dir (default: {DEFAULT_RUN})")
    parser.add_argument("--out", default=None, help="export directory (default: final/ beside checkpoints/)")
    notices: list[str] = []
    try:
        args = parser.parse_args(argv)
        ckpt = find_checkpoint(args.ckpt, notices)
        for line in notices:
            print(line, file=sys.stderr)
        dest = export(ckpt, args.out)
    except (UsageError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or foreign folder: 2; a full disk: 1
        print(f"error: {e.filename or args.out}: cannot write the export ({e.strerror or e})", file=sys.stderr)
        return write_status(e)
    print(f"exported {ckpt} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
