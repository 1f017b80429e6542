"""One typed config for the whole project.

Every default lives in the dataclasses below. A YAML file (``--config FILE``) and dotted ``key=value``
arguments only override them, in that order: defaults < file < command line. An unknown key, a wrong
type or a value out of range raises :class:`ConfigError` with one line that names the key.

    cfg = parse_args(["--config", "configs/fp16.yaml", "train.max_steps=200"])
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line that names the key and what is allowed."""


# ----------------------------------------------------------------------------
# The config tree


@dataclass
class ScalerConfig:
    """GradScaler knobs; passed to Accelerate as GradScalerKwargs (fp16 only)."""

    init_scale: float = 65536.0  # 2**16, PyTorch's default
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000  # clean steps before the scale grows


@dataclass
class GuardConfig:
    """What to do when the loss scale collapses (every step skipped, scale driven toward 0)."""

    min_scale: float = 2.0**-14
    max_consecutive_skips: int = 25
    action: str = "warn"  # warn | stop | fallback


@dataclass
class AmpConfig:
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 ("no" is read as fp32)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    fp32_modules: list[str] = field(default_factory=list)  # module name patterns run without autocast
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs when running fp32 parts
    cudnn_benchmark: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 500  # optimizer steps
    batch_size: int = 32  # per process, per micro-step
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)  # local text files or globs; empty = Python's stdlib sources
    hub_name: str = ""  # a datasets hub name, for users with a network; never the default
    text_column: str = "text"
    seq_len: int = 128
    max_bytes: int = 3_000_000  # cap on the default corpus; 0 = no cap
    val_fraction: float = 0.05
    num_workers: int = 0


@dataclass
class ModelConfig:
    d_model: int = 192
    n_layer: int = 4
    n_head: int = 6
    dropout: float = 0.0


@dataclass
class EvalConfig:
    every: int = 0  # steps between evals; 0 = only at the end
    batches: int = 20  # val batches per eval; 0 = the whole split


@dataclass
class CheckpointConfig:
    every: int = 250  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # newest checkpoints kept


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines / metric reads (the only device syncs of the monitor)
    live: bool = True  # rich live panel on a terminal; plain lines when false or not a TTY
    trackers: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard]


@dataclass
class Config:
    out_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto | none | PATH to a checkpoint directory
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GUARD_ACTIONS = ("warn", "stop", "fallback")


# ----------------------------------------------------------------------------
# Overriding: typed assignment by dotted key


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a list of strings" if typing.get_origin(tp) is list else str(tp)
    )


def _coerce(key: str, tp: Any, value: Any, text: bool = False) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted where floats are expected.

    ``text``: the value is command-line text; string fields keep it verbatim, others read it as YAML.
    """
    if text:
        if tp is str:
            return value
        value = parse_value(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads `precision: no` as false
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
    elif typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def set_key(cfg: Config, key: str, value: Any, text: bool = False) -> None:
    """Set a dotted key (``amp.scaler.init_scale``) on ``cfg`` with type checking.

    ``text=True`` for command-line values: they are read like YAML, except string fields keep them as typed.
    """
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        types_ = _field_types(type(node))
        if part not in types_:
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(types_)
            raise ConfigError(f"{key}: unknown key (allowed under {where}: {allowed})")
        tp = types_[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if text or not isinstance(value, dict):
                    raise ConfigError(f"{key}: is a section; set its keys, e.g. {key}.{next(iter(_field_types(tp)))}=...")
                for sub, subval in value.items():
                    set_key(cfg, f"{key}.{sub}", subval)
            else:
                setattr(node, part, _coerce(key, tp, value, text))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = getattr(node, part)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for k, v in data.items():
            out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
        return out
    return []


def load_yaml(cfg: Config, path: str | Path) -> None:
    """Apply a YAML file's keys on top of ``cfg``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"--config: {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of keys, got {type(data).__name__}")
    for key, value in _flatten(data):
        try:
            set_key(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None


def parse_value(text: str) -> Any:
    """Read a command-line value the way YAML would: 1e-3 -> float, true -> bool, [a,b] -> list."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------
# Validation: ranges and choices


def validate(cfg: Config) -> Config:
    """Check ranges and choices; normalise aliases (``amp.precision=no`` -> fp32)."""

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {allowed}, got {value!r}")

    p = cfg.amp.precision.lower()
    cfg.amp.precision = "fp32" if p in ("no", "fp32", "float32") else p
    need(cfg.amp.precision in PRECISIONS, "amp.precision", "one of auto|fp32|bf16|fp16 (or no)", p)
    s = cfg.amp.scaler
    need(math.isfinite(s.init_scale) and s.init_scale > 0, "amp.scaler.init_scale", "a finite number > 0", s.init_scale)
    need(s.growth_factor > 1, "amp.scaler.growth_factor", "> 1", s.growth_factor)
    need(0 < s.backoff_factor < 1, "amp.scaler.backoff_factor", "in (0, 1)", s.backoff_factor)
    need(s.growth_interval >= 1, "amp.scaler.growth_interval", ">= 1", s.growth_interval)
    g = cfg.amp.guard
    need(g.min_scale >= 0, "amp.guard.min_scale", ">= 0", g.min_scale)
    need(g.max_consecutive_skips >= 1, "amp.guard.max_consecutive_skips", ">= 1", g.max_consecutive_skips)
    need(g.action in GUARD_ACTIONS, "amp.guard.action", "one of warn|stop|fallback", g.action)
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", ">= 1", t.max_steps)
    need(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(0 <= t.min_lr <= t.lr, "train.min_lr", "between 0 and train.lr", t.min_lr)
    need(t.warmup_steps >= 0, "train.warmup_steps", ">= 0", t.warmup_steps)
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    need(t.grad_accum >= 1, "train.grad_accum", ">= 1", t.grad_accum)
    need(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    d = cfg.data
    need(d.seq_len >= 2, "data.seq_len", ">= 2", d.seq_len)
    need(d.max_bytes >= 0, "data.max_bytes", ">= 0", d.max_bytes)
    need(0 < d.val_fraction < 1, "data.val_fraction", "in (0, 1)", d.val_fraction)
    need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    m = cfg.model
    need(m.d_model >= 1 and m.n_head >= 1 and m.d_model % m.n_head == 0, "model.n_head", "a divisor of model.d_model", m.n_head)
    need(m.n_layer >= 1, "model.n_layer", ">= 1", m.n_layer)
    need(0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    need(cfg.eval.every >= 0, "eval.every", ">= 0", cfg.eval.every)
    need(cfg.eval.batches >= 0, "eval.batches", ">= 0", cfg.eval.batches)
    need(cfg.checkpoint.every >= 0, "checkpoint.every", ">= 0", cfg.checkpoint.every)
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", ">= 1", cfg.checkpoint.keep)
    need(cfg.log.every >= 1, "log.every", ">= 1", cfg.log.every)
    need(cfg.out_dir != "", "out_dir", "a directory path", cfg.out_dir)
    return cfg


# ----------------------------------------------------------------------------
# Entry points


USAGE = "usage: python -m PACKAGE.train [--config FILE.yaml] [key=value ...]"


def parse_args(argv: list[str]) -> Config:
    """Build the config from defaults, then ``--config`` files, then ``key=value`` arguments."""
    cfg = Config()
    files: list[str] = []
    overrides: list[tuple[str, str]] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            path = next(it, None)
            if path is None:
                raise ConfigError("--config: needs a file path")
            files.append(path)
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            overrides.append((key.strip(), value))
        else:
            raise ConfigError(f"{arg}: not a key=value override or --config FILE ({USAGE})")
    for path in files:
        load_yaml(cfg, path)
    for key, value in overrides:
        set_key(cfg, key, value, text=True)
    return validate(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (saved with every checkpoint)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from :func:`to_dict` output (unknown keys are errors)."""
    cfg = Config()
    for key, value in _flatten(data):
        set_key(cfg, key, value)
    return validate(cfg)


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, lists as strings (for trackers' hparams)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


__all__ = ["Config", "ConfigError", "parse_args", "set_key", "load_yaml", "to_dict", "from_dict", "to_yaml", "validate", "flat"]
