"""One typed config for the whole project.

Every default lives in the dataclasses below. A YAML file (``--config FILE``) and dotted ``key=value``
arguments only override them, in that order: defaults < file < command line. An unknown key, a wrong
type or a value out of range raises :class:`ConfigError` with one line that names the key.
``--help`` and ``--print-config`` raise :class:`ConfigExit` with the text to print (exit code 0).

    cfg = parse_args(["--config", "configs/fp16.yaml", "train.max_steps=200"])

The trailing ``# comment`` of each key and each class docstring are its ``--help`` text: keep them short.
This module imports only the standard library and yaml, so a bad key is reported before torch loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .amp.defaults import PRECISIONS, SCALER_DEFAULTS, check_scaler, flat, normalise_precision
from .amp.guard import GuardPolicy


class ConfigError(ValueError):
    """A bad config value; the message is one line that names the key and what is allowed."""


class ConfigExit(Exception):
    """Not an error: ``--help`` or ``--print-config`` asked for ``text`` to be printed instead of a run."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


# ----------------------------------------------------------------------------
# The config tree


@dataclass
class ScalerConfig:
    """GradScaler knobs, passed to Accelerate as GradScalerKwargs (fp16 only)."""

    init_scale: float = SCALER_DEFAULTS["init_scale"]  # 2**16, PyTorch's default; at most 3.4e38 (a float32)
    growth_factor: float = SCALER_DEFAULTS["growth_factor"]  # scale *= growth_factor after growth_interval clean steps
    backoff_factor: float = SCALER_DEFAULTS["backoff_factor"]  # scale *= backoff_factor on an overflow (step skipped)
    growth_interval: int = SCALER_DEFAULTS["growth_interval"]  # clean steps before the scale grows


@dataclass
class GuardConfig:
    """What to do when the loss scale collapses (every step skipped, scale driven toward 0)."""

    min_scale: float = GuardPolicy.min_scale  # a scale below this counts as collapsed (2**-14)
    max_consecutive_skips: int = GuardPolicy.max_consecutive_skips  # this many skipped steps in a row counts too
    action: str = GuardPolicy.action  # warn | stop (save and exit 3) | fallback (save, go on in a safer precision)


@dataclass
class AutoConfig:
    """How amp.precision=auto decides where the hardware alone cannot (a CPU with AVX512-BF16 or AMX, a GPU)."""

    measure: bool = True  # time fp32 and bf16 (and fp16 on a GPU) on this model first; cached per machine and shape


@dataclass
class AmpConfig:
    """Mixed precision: which precision runs, and the fp16 loss scaler and its guard."""

    precision: str = "auto"  # auto | fp32 | bf16 | fp16 ("no" is read as fp32)
    auto: AutoConfig = field(default_factory=AutoConfig)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    fp32_modules: list[str] = field(default_factory=list)  # module name patterns run without autocast
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs when running fp32 parts
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest kernels (not bitwise reproducible)


@dataclass
class TrainConfig:
    """The optimizer (AdamW), its warmup + cosine learning-rate schedule, and the batch."""

    max_steps: int = 500  # optimizer steps
    batch_size: int = 32  # per process, per micro-step
    lr: float = 2e-3  # peak learning rate, reached after warmup
    min_lr: float = 2e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warmup, in optimizer steps
    weight_decay: float = 0.1  # AdamW decay on 2-D weights (matrices, embeddings); none on biases and norms
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    fused_optimizer: bool = False  # fused AdamW kernel (CUDA, or CPU with torch >= 2.4)
    compile: bool = False  # torch.compile the model (inductor); the first steps pay for compilation


@dataclass
class DataConfig:
    """The text the model learns, cut into byte blocks of seq_len + 1."""

    files: list[str] = field(default_factory=list)  # local text files or globs; empty = Python's stdlib sources
    hub_name: str = ""  # a datasets hub name, for users with a network; never the default
    text_column: str = "text"  # the column holding the text (data.hub_name only)
    seq_len: int = 128  # bytes of context per block
    max_bytes: int = 3_000_000  # cap on the default corpus; 0 = no cap
    val_fraction: float = 0.05  # the last blocks held out for evaluation
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    """The small byte-level transformer."""

    d_model: int = 192  # width of the residual stream
    n_layer: int = 4  # transformer blocks
    n_head: int = 6  # attention heads; must divide d_model
    dropout: float = 0.0  # dropout probability in [0, 1)


@dataclass
class EvalConfig:
    """Held-out accuracy, loss and perplexity on the validation split."""

    every: int = 0  # steps between evals; 0 = only at the end
    batches: int = 20  # val batches per eval; 0 = the whole split
    precision: str = "train"  # train = in the training precision; fp32 = in full precision, autocast off


@dataclass
class CheckpointConfig:
    """Atomic checkpoints in out_dir/checkpoints (resume restores everything)."""

    every: int = 250  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # newest checkpoints kept


@dataclass
class LogConfig:
    """Console, metrics.jsonl and trackers."""

    every: int = 10  # steps between log lines / metric reads (the only device syncs of the monitor)
    live: bool = True  # rich live panel on a terminal; plain lines when false or not a TTY
    trackers: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard] or [wandb]
    run_name: str = ""  # the trackers' project/run name; empty = the name of out_dir
    tracker_kwargs: dict = field(default_factory=dict)  # per tracker, e.g. {wandb: {entity: me, tags: [amp]}}


@dataclass
class Config:
    """The run: where it writes, its seed, and where it resumes from."""

    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl and amp_summary.json go here
    seed: int = 0  # model init and data order
    resume: str = "auto"  # auto | none | PATH to a checkpoint directory
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


GUARD_HINT = ("config keys: amp.guard.action (warn|stop|fallback), amp.guard.min_scale, "
              "amp.guard.max_consecutive_skips; to try: --config configs/fp16_safe.yaml (lower "
              "amp.scaler.init_scale), amp.precision=bf16, amp.fp32_modules=[lm_head,'*.norm*'], a lower train.lr")

# Keys a checkpoint cannot be resumed under when they change: the weights would not load (model.*), or the
# run would silently become another experiment (other data, another split, another seed). An entry names a
# key or a whole section. Any other change is applied on resume, with a notice (see resume_changes).
RESUME_INCOMPATIBLE = ("model", "data.seq_len", "data.files", "data.hub_name", "data.text_column", "data.max_bytes",
                       "data.val_fraction", "seed")
# Keys expected to differ between the first run and a resume: not worth a notice.
RESUME_IGNORED = ("resume",)


# ----------------------------------------------------------------------------
# Overriding: typed assignment by dotted key


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, "a list of strings" if typing.get_origin(tp) is list else str(tp)
    )


_NO = object()  # a reader's "this value is not of my type"


def _read_bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _NO


def _read_int(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else _NO


def _read_float(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return _NO


def _read_str(value: Any) -> Any:
    if isinstance(value, bool):  # YAML 1.1 reads `precision: no` as false
        return "yes" if value else "no"
    return str(value) if isinstance(value, (str, int, float)) else _NO


def _read_list(value: Any) -> Any:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    return _NO


_READERS = {bool: _read_bool, int: _read_int, float: _read_float, str: _read_str}


def _coerce(key: str, tp: Any, value: Any, text: bool = False) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted where floats are expected.

    ``text``: the value is command-line text; string fields keep it verbatim, others read it as YAML.
    """
    shown = value
    if text:
        if tp is str:
            return value
        value = parse_value(value)
    reader = _read_list if typing.get_origin(tp) is list else _READERS.get(tp)
    out = reader(value) if reader is not None else _NO
    if out is _NO:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    # nan slips through every range check (nan > 0 is False, and so is nan <= 0): refuse it here
    if tp is float and not math.isfinite(out):
        raise ConfigError(f"{key}: must be a finite number, got {shown}")
    return out


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
            raise ConfigError(f"{key}: unknown key{_did_you_mean(key)} (allowed under {where}: {allowed})")
        tp = types_[part]
        if tp is dict or typing.get_origin(tp) is dict:
            _set_mapping(node, part, parts[i + 1 :], key, value, text)
            return
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


def _set_mapping(node: Any, part: str, rest: list[str], key: str, value: Any, text: bool) -> None:
    """A mapping-valued key: set whole (``log.tracker_kwargs={wandb: {entity: me}}``) or one entry by its dotted path
    (``log.tracker_kwargs.wandb.entity=me``)."""
    value = parse_value(value) if text else value
    if not rest:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. {{wandb: {{entity: me}}}}, got {value!r}")
        setattr(node, part, dict(value))
        return
    target = getattr(node, part)
    for sub in rest[:-1]:
        target = target.setdefault(sub, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{key}: {sub} already holds a value, not a mapping")
    target[rest[-1]] = value


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, in declaration order (``out_dir``, ..., ``amp.scaler.init_scale``, ...)."""
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        keys += all_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{name}"]
    return keys


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, all_keys(), n=1)
    return f", did you mean {close[0]}?" if close else ""


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for k, v in data.items():
            out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
        return out
    return []


MAX_YAML_VALUES = 100_000  # a config holds hundreds; anchors that expand past this are a "billion laughs" file


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping and documents whose anchors expand past
    MAX_YAML_VALUES values (either is one ConfigError line, not a silent last-wins or a hang)."""

    def construct_document(self, node: yaml.Node) -> Any:
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:  # values after alias expansion; shared nodes counted once each, cheaply
            if id(n) not in sizes:
                sizes[id(n)] = 0  # a recursive alias: counted as nothing more
                if isinstance(n, yaml.MappingNode):
                    total = 1 + sum(size(k) + size(v) for k, v in n.value)
                elif isinstance(n, yaml.SequenceNode):
                    total = 1 + sum(size(v) for v in n.value)
                else:
                    total = 1
                sizes[id(n)] = min(total, MAX_YAML_VALUES + 1)
            return sizes[id(n)]

        if size(node) > MAX_YAML_VALUES:
            raise ConfigError(f"expands to more than {MAX_YAML_VALUES:,} values through its anchors and aliases "
                              "(a config holds hundreds); write the values out")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"the key {key!r} is given twice in one mapping (line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects


def load_yaml(cfg: Config, path: str | Path) -> list[str]:
    """Apply a YAML file's keys on top of ``cfg``; returns the dotted keys it set."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config: {p} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {p}: {e.strerror or e}") from None
    try:
        data = _load(text) or {}
    except ConfigError as e:
        raise ConfigError(f"--config: {p}: {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"--config: {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of keys, got {type(data).__name__}")
    keys = []
    for key, value in _flatten(data):
        try:
            set_key(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        keys.append(key)
    return keys


def parse_value(text: str) -> Any:
    """Read a command-line value the way YAML would: 1e-3 -> float, true -> bool, [a,b] -> list."""
    try:
        return _load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------
# Validation: ranges and choices


def validate(cfg: Config) -> Config:
    """Check ranges and choices; normalise aliases (``amp.precision=no`` -> fp32)."""

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {allowed}, got {value!r}")

    p = cfg.amp.precision
    cfg.amp.precision = normalise_precision(p)
    need(cfg.amp.precision in PRECISIONS, "amp.precision", f"one of {'|'.join(PRECISIONS)} (or no)", p)
    for section, check in (("amp.scaler", lambda: check_scaler(**dataclasses.asdict(cfg.amp.scaler))),
                           ("amp.guard", lambda: GuardPolicy(**dataclasses.asdict(cfg.amp.guard)))):
        try:  # the core's own checks; its messages start with the setting's name
            check()
        except ValueError as e:
            raise ConfigError(f"{section}.{e}") from None
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
    ep = cfg.eval.precision
    cfg.eval.precision = "train" if str(ep).strip().lower() == "train" else normalise_precision(ep)
    need(cfg.eval.precision in ("train", "fp32"), "eval.precision", "train or fp32 (or no)", ep)
    need(cfg.checkpoint.every >= 0, "checkpoint.every", ">= 0", cfg.checkpoint.every)
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", ">= 1", cfg.checkpoint.keep)
    need(cfg.log.every >= 1, "log.every", ">= 1", cfg.log.every)
    need(cfg.out_dir != "", "out_dir", "a directory path", cfg.out_dir)
    need(0 <= cfg.seed < 2**32, "seed", "between 0 and 2**32 - 1 (what numpy and torch accept)", cfg.seed)
    name = cfg.log.run_name
    need(name == "" or ("/" not in name and "\\" not in name and name not in (".", "..")), "log.run_name",
         "a plain name (no / or \\, not . or ..): trackers write under out_dir/NAME", name)
    return cfg


# ----------------------------------------------------------------------------
# Entry points


USAGE = (
    f"usage: python -m {__package__ or 'PACKAGE'}.train [--config FILE.yaml] [key=value ...] [--print-config] "
    "[-h | --help]"
)


def parse_args(argv: list[str], notices: list[str] | None = None) -> Config:
    """Build the config from defaults, then ``--config`` files, then ``key=value`` arguments.

    ``-h``/``--help`` raises :class:`ConfigExit` with :func:`help_text`; ``--print-config`` raises it with the
    resolved, validated config as YAML. Bad input raises :class:`ConfigError`. ``notices`` receives one line
    naming the keys a file set and the command line changed.
    """
    if "-h" in argv or "--help" in argv:
        raise ConfigExit(help_text())
    cfg = Config()
    files: list[str] = []
    overrides: list[tuple[str, str]] = []
    print_config = False
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            path = next(it, None)
            if not path:
                raise ConfigError("--config: needs a file path")
            files.append(path)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            if not path:
                raise ConfigError("--config: needs a file path")
            files.append(path)
        elif arg == "--print-config":
            print_config = True
        elif "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            overrides.append((key.strip(), value))
        else:
            raise ConfigError(f"{arg}: not a key=value override or --config FILE ({USAGE})")
    from_files: dict[str, str] = {}
    for path in files:
        from_files.update(dict.fromkeys(load_yaml(cfg, path), path))
    before = flat(to_dict(cfg))
    for key, value in overrides:
        set_key(cfg, key, value, text=True)
    after = flat(to_dict(cfg))
    changed = [f"{k} {before[k]} -> {after[k]} ({from_files[k]})" for k in dict.fromkeys(k for k, _ in overrides)
               if k in from_files and k in before and before[k] != after[k]]
    if changed and notices is not None:
        notices.append(f"config: the command line overrode the file's {', '.join(changed)}")
    validate(cfg)
    if print_config:
        raise ConfigExit(to_yaml(cfg).rstrip("\n"))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (saved with every checkpoint)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from :func:`to_dict` output (unknown keys are errors)."""
    cfg = Config()
    for key, value in _flatten(data):
        set_key(cfg, key, value)
    return validate(cfg)


def to_yaml(cfg: Config) -> str:
    """The config as YAML that ``--config`` reads back to the same config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def resume_changes(
    saved: dict[str, Any], cfg: Config
) -> tuple[list[tuple[str, object, object]], list[tuple[str, object, object]]]:
    """Compare a checkpoint's saved config (``meta.json["config"]``) with this run's config.

    Returns ``(incompatible, compatible)``, each a list of ``(dotted key, saved value, current value)`` for the
    keys that differ: incompatible ones are in :data:`RESUME_INCOMPATIBLE`, every other key is compatible,
    except :data:`RESUME_IGNORED`. A key only one side has (a checkpoint from an older or newer config) is
    skipped.
    """
    old = dict(_flatten(saved))
    incompatible: list[tuple[str, object, object]] = []
    compatible: list[tuple[str, object, object]] = []
    for key, new in _flatten(to_dict(cfg)):
        if key not in old or _matches(key, RESUME_IGNORED) or old[key] == new:
            continue
        (incompatible if _matches(key, RESUME_INCOMPATIBLE) else compatible).append((key, old[key], new))
    return incompatible, compatible


# ----------------------------------------------------------------------------
# --help: every key with its type, default and the comment written next to it above


def _source_docs() -> dict[str, tuple[str, dict[str, str]]]:
    """``{class name: (docstring, {field: trailing comment})}``, read from this file's source."""
    import ast
    import inspect
    import io
    import sys
    import tokenize

    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError):  # no source shipped (e.g. only .pyc): help without comments
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    docs: dict[str, tuple[str, dict[str, str]]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            fields = {
                stmt.target.id: comments.get(stmt.end_lineno or stmt.lineno, "")
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
            docs[node.name] = (" ".join((ast.get_docstring(node) or "").split()), fields)
    return docs


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if value == "":
        return '""'
    return str(value)


def _type_label(tp: Any) -> str:
    return "list[str]" if typing.get_origin(tp) is list else getattr(tp, "__name__", str(tp))


def help_text() -> str:
    """The ``--help`` text: usage, precedence, then every key by section with type, default and comment."""
    docs = _source_docs()
    sections: list[tuple[str, str, list[tuple[str, str, str, str]]]] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        doc, comments = docs.get(cls.__name__, ("", {}))
        rows, subs = [], []
        for name, tp in _field_types(cls).items():
            if dataclasses.is_dataclass(tp):
                subs.append((tp, getattr(obj, name), f"{prefix}{name}."))
            else:
                rows.append((f"{prefix}{name}", _type_label(tp), _show(getattr(obj, name)), comments.get(name, "")))
        sections.append((prefix.rstrip(".") or "top level", doc, rows))
        for sub in subs:
            walk(*sub)

    walk(Config, Config(), "")
    all_rows = [row for _, _, rows in sections for row in rows]
    wk, wt, wd = (max(len(row[i]) for row in all_rows) for i in range(3))
    lines = [
        USAGE,
        "",
        "Train with the config below. Precedence: defaults < --config FILE.yaml (files apply in the order given)",
        "< key=value arguments (in order), so the command line wins. Values are read like YAML: 1e-3 is a number,",
        "true/false a boolean, [a,b] or a,b a list; string keys keep the text as typed. Sections nest in a YAML",
        "file and join with dots on the command line (amp.scaler.init_scale=1024).",
        "",
        "  --config FILE.yaml, -c FILE.yaml   apply a YAML file of keys (e.g. configs/fp16.yaml); may repeat",
        "  --print-config                     print the resolved config as YAML (usable as --config) and exit",
        "  -h, --help                         show this help and exit",
    ]
    for title, doc, rows in sections:
        lines += ["", f"{title}: {doc}" if doc else f"{title}:"]
        for key, tp, default, comment in rows:
            lines.append(f"  {key:<{wk}}  {tp:<{wt}}  {default:<{wd}}  {comment}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Checks at run time: trackers installed, a checkpoint of the same experiment

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
                   "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "trackio": "trackio"}


def check_trackers(names: list[str], kwargs: dict) -> None:
    """A tracker that is not installed is one line saying how to install it (Accelerate would only warn)."""
    for name in kwargs:
        if name not in names or not isinstance(kwargs[name], dict):
            raise ConfigError(f"log.tracker_kwargs: {name!r} must be one of log.trackers ({', '.join(names) or 'none'}) "
                              "and hold a mapping, e.g. {wandb: {entity: me}}")
    for name in names:
        module = TRACKER_MODULES.get(name)
        if module is None:
            raise ConfigError(f"log.trackers: unknown tracker {name!r} (one of {', '.join(TRACKER_MODULES)})")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.trackers: {name} is not installed (pip install {module})")


def resume_check(cfg: Config) -> Any:
    """Refuse a checkpoint of another experiment (model shape, data); list the settings that changed but fit."""

    def check(meta: dict) -> list[str]:
        saved = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            return []
        incompatible, changed = resume_changes(saved, cfg)
        if incompatible:
            diffs = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in incompatible)
            raise ConfigError(f"resume: {cfg.out_dir} holds a checkpoint of another experiment ({diffs}); "
                              "start fresh with resume=none (the old run is moved aside) or use another out_dir")
        if changed:
            return ["resume: settings changed since the checkpoint: "
                    + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed)]
        return []

    return check


__all__ = [
    "TRACKER_MODULES",
    "Config",
    "ConfigError",
    "ConfigExit",
    "check_trackers",
    "resume_check",
    "RESUME_INCOMPATIBLE",
    "RESUME_IGNORED",
    "USAGE",
    "all_keys",
    "flat",
    "from_dict",
    "help_text",
    "load_yaml",
    "parse_args",
    "resume_changes",
    "set_key",
    "to_dict",
    "to_yaml",
    "validate",
]
