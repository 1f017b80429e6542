"""The config tree: every section, default and check (``configparse.py`` reads YAML and key=value into it). A new key
is a field, its default and ``# comment`` (its ``--help`` and README row), and a :func:`validate` line if ranged."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import configparse
from .amp.settings import AmpSettings, SettingsError, flat, normalise_precision
from .configparse import ConfigError, ConfigExit, load_yaml, set_key, to_dict, to_yaml
from .example import config as example_config
from .example.config import DataConfig, ModelConfig


@dataclass
class TrainConfig:
    """The optimizer (AdamW), its warmup + cosine learning-rate schedule, and the batch."""

    max_steps: int = 500  # optimizer steps
    batch_size: int = 32  # per process, per micro-step
    lr: float = 2e-3  # peak learning rate, reached after warmup
    min_lr: float = 2e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warmup, in optimizer steps
    weight_decay: float = 0.1  # AdamW decay on weights of 2 or more dimensions; none on biases and norms
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    fused_optimizer: bool = False  # fused AdamW kernel (CUDA, or CPU with torch >= 2.4)
    compile: bool = False  # torch.compile the model (inductor); the first steps pay for compilation


@dataclass
class EvalConfig:
    """Held-out metrics on the validation split (the loss and the example's own, computed in float32)."""

    every: int = 0  # steps between evals; 0 = only at the end
    batches: int = 20  # val batches per eval; 0 = the whole split
    precision: str = "train"  # train = in the training precision; fp32 = in full precision, autocast off


@dataclass
class Config:
    """The run: where it writes, its seed, and where it resumes from."""

    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl and amp_summary.json go here
    seed: int = 0  # model init and data order
    resume: str = "auto"  # auto | none | PATH to a checkpoint directory
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the example's section (example/config.py)
    model: ModelConfig = field(default_factory=ModelConfig)  # the example's section (example/config.py)
    amp: AmpSettings = field(default_factory=lambda: AmpSettings(tf32=True, checkpoint_every=250))  # amp/settings.py
    eval: EvalConfig = field(default_factory=EvalConfig)

    # keys of earlier releases (a checkpoint's saved config reads with them) and words users try: did you mean
    MOVED = {"log.every": "amp.log_every", "log.live": "amp.live", "log.trackers": "amp.trackers",
             "log.run_name": "amp.run_name", "log.tracker_kwargs": "amp.tracker_kwargs",
             "checkpoint.every": "amp.checkpoint_every", "checkpoint.keep": "amp.keep"}
    SYNONYMS = {**MOVED, "learning_rate": "train.lr", "lr": "train.lr", "lr_rate": "train.lr",
                "epochs": "train.max_steps", "max_steps": "train.max_steps", "steps": "train.max_steps",
                "batch_size": "train.batch_size", "fp16": "amp.precision", "bf16": "amp.precision",
                "precision": "amp.precision", "mixed_precision": "amp.precision", "output_dir": "out_dir"}


def guard_hint(precision: str) -> str:
    """What to try after the guard stopped a run in ``precision`` (a loss scale only where fp16 has one)."""
    keys = "config keys: amp.guard.action (warn|stop|fallback), amp.guard.min_scale, amp.guard.max_consecutive_skips"
    if precision == "fp16":
        return (f"{keys}; to try: --config configs/fp16_safe.yaml (lower amp.scaler.init_scale), amp.precision=bf16, "
                f"amp.fp32_modules=[the module that `python -m {__package__}.locate OUT_DIR` names], a lower train.lr")
    return (f"{keys}; to try: a lower train.lr, train.grad_clip, amp.fp32_modules=[the modules that "
            f"`python -m {__package__}.numerics OUT_DIR` suggests], the data checked for non-finite values")

# Keys (or whole sections) a checkpoint cannot be resumed under when they change: the weights would not load, or the
# run would silently become another experiment (the example names its own). Any other change applies, with a notice.
RESUME_INCOMPATIBLE = ("seed", *example_config.RESUME_INCOMPATIBLE)
RESUME_IGNORED = ("resume",)  # expected to differ between the first run and a resume: not worth a notice


def validate(cfg: Config) -> Config:
    """Check ranges and choices; normalise aliases (``amp.precision=no`` -> fp32)."""

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {allowed}, got {value!r}")

    try:  # the core's own checks, at construction (they normalise aliases); its messages start with the key
        cfg.amp = dataclasses.replace(cfg.amp)
    except SettingsError as e:
        raise ConfigError(f"amp.{e}") from None
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", ">= 1", t.max_steps)
    need(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(0 <= t.min_lr <= t.lr, "train.min_lr", "between 0 and train.lr", t.min_lr)
    need(t.warmup_steps >= 0, "train.warmup_steps", ">= 0", t.warmup_steps)
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    need(t.grad_accum >= 1, "train.grad_accum", ">= 1", t.grad_accum)
    need(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    example_config.validate(cfg, need)
    need(cfg.eval.every >= 0, "eval.every", ">= 0", cfg.eval.every)
    need(cfg.eval.batches >= 0, "eval.batches", ">= 0", cfg.eval.batches)
    ep = cfg.eval.precision
    cfg.eval.precision = "train" if str(ep).strip().lower() == "train" else normalise_precision(ep)
    need(cfg.eval.precision in ("train", "fp32"), "eval.precision", "train or fp32 (or no)", ep)
    need(cfg.out_dir != "", "out_dir", "a directory path", cfg.out_dir)
    need(0 <= cfg.seed < 2**32, "seed", "between 0 and 2**32 - 1 (what numpy and torch accept)", cfg.seed)
    return cfg


COMMAND = f"python -m {__package__ or 'PACKAGE'}.train"


def parse_args(argv: list[str], notices: list[str] | None = None) -> Config:
    """Defaults, then ``--config`` files, then ``key=value`` arguments, validated (see configparse.parse_args)."""
    return configparse.parse_args(argv, Config, validate, COMMAND, notices)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from :func:`to_dict` output (unknown keys are errors)."""
    return configparse.from_dict(data, Config, validate)


README_START, README_END = "<!-- config keys: start -->", "<!-- config keys: end -->"


def readme_table() -> str:
    """The README's key table, a row per key of the tree above (``python -m PACKAGE.config --write README.md``)."""
    bar = str.maketrans({"|": "\\|"})  # a bare | would end the cell
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for _, _, rows in configparse.sections(Config):
        lines += [f"| `{key}` | {tp} | `{default.translate(bar)}` | {comment.translate(bar)} |"
                  for key, tp, default, comment in rows]
    return "\n".join(lines)


def all_keys() -> list[str]:
    """Every settable dotted key, in declaration order (``out_dir``, ..., ``amp.scaler.init_scale``, ...)."""
    return configparse.all_keys(Config)


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def resume_changes(saved: dict[str, Any], cfg: Config) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(incompatible, compatible): the ``(key, saved, current)`` that differ between a checkpoint's config and ``cfg``,
    by :data:`RESUME_INCOMPATIBLE`; :data:`RESUME_IGNORED` and keys only one side has are skipped."""
    old, incompatible, compatible = dict(configparse._flatten(saved)), [], []
    for key, new in configparse._flatten(to_dict(cfg)):
        if key not in old or _matches(key, RESUME_IGNORED) or old[key] == new:
            continue
        (incompatible if _matches(key, RESUME_INCOMPATIBLE) else compatible).append((key, old[key], new))
    return incompatible, compatible


TRACKER_MODULES = {name: name for name in ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive",
                                           "swanlab", "trackio")}  # tracker -> the module it imports (and pip installs)


def check_trackers(names: list[str], kwargs: dict) -> None:
    """A tracker that is not installed is one line saying how to install it (Accelerate would only warn)."""
    for name in kwargs:
        if name not in names or not isinstance(kwargs[name], dict):
            raise ConfigError(f"amp.tracker_kwargs: {name!r} must be one of amp.trackers "
                              f"({', '.join(names) or 'none'}) and hold a mapping, e.g. {{wandb: {{entity: me}}}}")
    for name in names:
        if (module := TRACKER_MODULES.get(name)) is None:
            raise ConfigError(f"amp.trackers: unknown tracker {name!r} (one of {', '.join(TRACKER_MODULES)})")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"amp.trackers: {name} is not installed (pip install {module})")


def resume_check(cfg: Config) -> Any:
    """Refuse a checkpoint of another experiment (model shape, data); list the settings that changed but fit."""

    def check(meta: dict) -> list[str]:
        saved = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            return []
        incompatible, changed = (", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in diffs)
                                 for diffs in resume_changes(saved, cfg))
        if incompatible:
            raise ConfigError(f"resume: {cfg.out_dir} holds a checkpoint of another experiment ({incompatible}); "
                              "start fresh with resume=none (the old run is moved aside) or use another out_dir")
        return [f"resume: settings changed since the checkpoint: {changed}"] if changed else []

    return check


__all__ = ["TRACKER_MODULES", "Config", "ConfigError", "ConfigExit", "check_trackers", "resume_check",
           "RESUME_INCOMPATIBLE", "RESUME_IGNORED", "COMMAND", "all_keys", "flat", "from_dict", "load_yaml",
           "parse_args", "resume_changes", "set_key", "to_dict", "to_yaml", "validate"]


def _readme_main(argv: list[str]) -> int:
    """``python -m PACKAGE.config [--check|--write] [README.md]``: print, check or rewrite the README's key table."""
    p = configparse.UsageParser(prog=f"python -m {__package__}.config", description="Print the table of every config "
                                "key; --check or --write it between the README's markers.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's table differs from config.py")
    mode.add_argument("--write", action="store_true", help="rewrite the README's table (written whole, then renamed)")
    p.add_argument("readme", nargs="?", default="README.md", help="the README (default README.md)")
    try:
        a = p.parse_args(argv)
        if not (a.check or a.write):
            print(readme_table(), flush=True)
            return 0
        path = Path(a.readme)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or "unreadable"
            raise ConfigError(f"{path}: {'no such file' if not path.exists() else why}") from None
        start, end = text.find(README_START), text.find(README_END)
        if start < 0 or end < start:
            raise ConfigError(f"{path}: no {README_START} ... {README_END} block (in that order) to hold the key table")
        new = f"{text[:start]}{README_START}\n{readme_table()}\n{text[end:]}"
        if a.check and new != text:
            print(f"error: {path}: the key table differs from config.py; run python -m {__package__}.config "
                  f"--write {path}", file=sys.stderr)
            return 1
        if a.write:
            tmp = path.with_name(f".{path.name}.tmp")
            try:  # a full disk leaves the README as it was
                tmp.write_text(new, encoding="utf-8")
                tmp.replace(path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                print(f"error: {path}: cannot write ({e.strerror or e}); it is unchanged", file=sys.stderr)
                return 1
            print(f"wrote the key table of {path}")
        return 0
    except (ConfigError, configparse.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(_readme_main(sys.argv[1:]))
