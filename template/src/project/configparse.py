"""A dataclass config tree (``config.py``) from defaults < ``--config FILE.yaml`` < ``key=value``, and its ``--help``
(each field's trailing ``# comment``, each class docstring). Standard library and yaml only: errors precede torch."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import math
import sys
import tokenize
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .amp.settings import flat


class ConfigError(ValueError):
    """A bad config value; the message is one line that names the key and what is allowed."""


class ConfigExit(Exception):
    """Not an error: ``--help`` or ``--print-config`` asked for ``text`` to be printed instead of a run."""

    text = property(lambda self: self.args[0])


class UsageError(ValueError):
    """Bad input to one of the project's commands (bench, locate, numerics): one line, and exit code 2."""


class UsageParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one :class:`UsageError` line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


_NO = object()  # _read's "this value is not of the field's type"


def _read(tp: Any, value: Any) -> Any:
    """``value`` as the field type ``tp`` (ints where floats are expected), or ``_NO``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if number and isinstance(value, int) else _NO
    if tp is float:
        try:  # a string too: YAML 1.1 reads 1e-3 (no dot) as one
            return float(value) if number or isinstance(value, str) else _NO
        except ValueError:
            return _NO
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads `precision: no` as false
            return "yes" if value else "no"
        return str(value) if isinstance(value, (str, int, float)) else _NO
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
    return _NO


def _coerce(key: str, tp: Any, value: Any, text: bool = False) -> Any:
    """``value`` checked as the field type ``tp``; ``text``: command-line text (YAML, but verbatim for a string)."""
    if text and tp is str:
        return value
    shown, value = value, (parse_value(value) if text else value)
    if (out := _read(tp, value)) is _NO:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
        want = names.get(tp, "a list of strings" if typing.get_origin(tp) is list else str(tp))
        raise ConfigError(f"{key}: expected {want}, got {value!r}")
    # nan slips through every range check (nan > 0 is False, and so is nan <= 0): refuse it here
    if tp is float and not math.isfinite(out):
        raise ConfigError(f"{key}: must be a finite number, got {shown}")
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def set_key(cfg: Any, key: str, value: Any, text: bool = False) -> None:
    """Set a dotted key (``amp.scaler.init_scale``) on ``cfg``, type-checked; ``text``: as for :func:`_coerce`."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        types_ = _field_types(type(node))
        if part not in types_:
            where, allowed = ".".join(parts[:i]) or "the top level", ", ".join(types_)
            raise ConfigError(f"{key}: unknown key{_did_you_mean(key, type(cfg))} (allowed under {where}: {allowed})")
        tp = types_[part]
        if tp is dict or typing.get_origin(tp) is dict:
            _set_mapping(node, part, parts[i + 1 :], key, value, text)
            return
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = getattr(node, part)
        elif dataclasses.is_dataclass(tp):
            if text or not isinstance(value, dict):
                raise ConfigError(f"{key}: is a section; set its keys, e.g. {key}.{next(iter(_field_types(tp)))}=...")
            for sub, subval in value.items():
                set_key(cfg, f"{key}.{sub}", subval)
        else:  # object.__setattr__: frozen sections too (the tree is built before anyone reads it)
            object.__setattr__(node, part, _coerce(key, tp, value, text))


def _set_mapping(node: Any, part: str, rest: list[str], key: str, value: Any, text: bool) -> None:
    """A mapping-valued key, set whole (``amp.tracker_kwargs={wandb: {entity: me}}``) or by entry (``...wandb.x=y``)."""
    value = parse_value(value) if text else value
    if not rest:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. {{wandb: {{entity: me}}}}, got {value!r}")
        object.__setattr__(node, part, dict(value))
        return
    target = getattr(node, part)
    for sub in rest[:-1]:
        target = target.setdefault(sub, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{key}: {sub} already holds a value, not a mapping")
    target[rest[-1]] = value


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key, in declaration order (``out_dir``, ..., ``amp.scaler.init_scale``, ...)."""
    return [key for name, tp in _field_types(cls).items()
            for key in (all_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{name}"])]


def _did_you_mean(key: str, root: type) -> str:
    """The key meant: a synonym in the root's ``SYNONYMS`` (``learning_rate`` -> ``train.lr``), else the closest."""
    synonyms = getattr(root, "SYNONYMS", {})
    meant = synonyms.get(key) or synonyms.get(key.rsplit(".", 1)[-1])
    close = [meant] if meant else difflib.get_close_matches(key, all_keys(root), n=1)
    return f", did you mean {close[0]}?" if close else ""


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    return [item for k, v in (data.items() if isinstance(data, dict) else ())
            for item in (_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)])]


MAX_YAML_VALUES = 100_000  # a config holds hundreds; anchors that expand past this are a "billion laughs" file


class _Loader(yaml.SafeLoader):
    """Safe YAML; a key given twice in a mapping or anchors past MAX_YAML_VALUES are one ConfigError line."""

    def construct_document(self, node: yaml.Node) -> Any:
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:  # values after alias expansion; shared nodes counted once each, cheaply
            if id(n) not in sizes:
                sizes[id(n)] = 0  # a recursive alias: counted as nothing more
                children = n.value if isinstance(n, yaml.SequenceNode) else []
                if isinstance(n, yaml.MappingNode):
                    children = [c for pair in n.value for c in pair]
                sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_YAML_VALUES + 1)
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


def load_yaml(cfg: Any, path: str | Path) -> list[str]:
    """Apply a YAML file's keys on top of ``cfg``; returns the dotted keys it set."""
    p = Path(path)
    if not p.is_file():
        why = f"{p} is a directory, not a YAML file" if p.is_dir() else f"no such file: {p}"
        raise ConfigError(f"--config: {why}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {p}: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader) or {}  # a SafeLoader: no arbitrary objects
    except ConfigError as e:
        raise ConfigError(f"--config: {p}: {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"--config: {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of keys, got {type(data).__name__}")
    try:
        for key, value in _flatten(data):
            set_key(cfg, key, value)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return [key for key, _ in _flatten(data)]


def parse_value(text: str) -> Any:
    """Read a command-line value the way YAML would: 1e-3 -> float, true -> bool, [a,b] -> list."""
    try:
        return yaml.load(text, Loader=_Loader) if text != "" else ""
    except yaml.YAMLError:
        return text


def usage(command: str) -> str:
    return f"usage: {command} [--config FILE.yaml] [key=value ...] [--print-config] [-h | --help]"


def parse_args(argv: list[str], root: type, validate: Callable[[Any], Any], command: str,
               notices: list[str] | None = None) -> Any:
    """The config from defaults, ``--config`` files, then ``key=value`` arguments; ``--help`` and ``--print-config``
    raise :class:`ConfigExit` with the text. ``notices`` gets a line naming the file's keys the command line changed."""
    if "-h" in argv or "--help" in argv:
        raise ConfigExit(help_text(root, command))
    cfg, files, overrides, print_config = root(), [], [], False
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not path:
                raise ConfigError("--config: needs a file path")
            files.append(path)
        elif arg == "--print-config":
            print_config = True
        elif "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            overrides.append((key.strip(), value))
        else:
            raise ConfigError(f"{arg}: not a key=value override or --config FILE ({usage(command)})")
    from_files = {key: path for path in files for key in load_yaml(cfg, path)}
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


to_dict = dataclasses.asdict  # the resolved config as plain data (saved with every checkpoint)


def from_dict(data: dict[str, Any], root: type, validate: Callable[[Any], Any]) -> Any:
    """Rebuild a config from :func:`to_dict` output; a key in the root's ``MOVED`` (an older release's) is renamed."""
    cfg = root()
    moved = getattr(root, "MOVED", {})
    for key, value in _flatten(data):
        old = next((o for o in moved if key == o or key.startswith(o + ".")), None)
        set_key(cfg, key if old is None else moved[old] + key[len(old):], value)
    return validate(cfg)


def to_yaml(cfg: Any) -> str:
    """The config as YAML that ``--config`` reads back to the same config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def _source_docs(module: str) -> dict[str, tuple[str, dict[str, str]]]:
    """``{class name: (docstring, {field: trailing comment})}``, read from the source of ``module``."""
    try:
        source = inspect.getsource(sys.modules[module])
    except (OSError, TypeError):  # no source shipped (e.g. only .pyc): help without comments
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    docs: dict[str, tuple[str, dict[str, str]]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            fields = {stmt.target.id: comments.get(stmt.end_lineno or stmt.lineno, "") for stmt in node.body
                      if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
            docs[node.name] = (" ".join((ast.get_docstring(node) or "").split()), fields)
    return docs


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return '""' if value == "" else str(value)


def sections(root: type) -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    """``[(section, docstring, [(key, type, default as typed, comment), ...]), ...]``: what --help and README show."""
    out: list[tuple[str, str, list[tuple[str, str, str, str]]]] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        doc, comments = _source_docs(cls.__module__).get(cls.__name__, ("", {}))
        rows, subs = [], []
        for name, tp in _field_types(cls).items():
            if dataclasses.is_dataclass(tp):
                subs.append((tp, getattr(obj, name), f"{prefix}{name}."))
            else:
                label = "list[str]" if typing.get_origin(tp) is list else getattr(tp, "__name__", str(tp))
                rows.append((f"{prefix}{name}", label, _show(getattr(obj, name)), comments.get(name, "")))
        out.append((prefix.rstrip(".") or "top level", doc, rows))
        for sub in subs:
            walk(*sub)

    walk(root, root(), "")
    return out


def help_text(root: type, command: str) -> str:
    """The ``--help`` text: usage, precedence, then every key by section with type, default and comment."""
    sections_ = sections(root)
    wk, wt, wd = (max(len(row[i]) for _, _, rows in sections_ for row in rows) for i in range(3))
    lines = [
        usage(command), "",
        "Train with the config below. Precedence: defaults < --config FILE.yaml (files apply in the order given)",
        "< key=value arguments (in order), so the command line wins. Values are read like YAML: 1e-3 is a number,",
        "true/false a boolean, [a,b] or a,b a list; string keys keep the text as typed. Sections nest in a YAML",
        "file and join with dots on the command line (amp.scaler.init_scale=1024).",
        "",
        "  --config FILE.yaml, -c FILE.yaml   apply a YAML file of keys (e.g. configs/fp16.yaml); may repeat",
        "  --print-config                     print the resolved config as YAML (usable as --config) and exit",
        "  -h, --help                         show this help and exit"]
    for title, doc, rows in sections_:
        lines += ["", f"{title}: {doc}" if doc else f"{title}:"]
        for key, tp, default, comment in rows:
            lines.append(f"  {key:<{wk}}  {tp:<{wt}}  {default:<{wd}}  {comment}".rstrip())
    return "\n".join(lines)
