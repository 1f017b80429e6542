"""Render the project template into a new folder: ``amptpl new NAME``.

The template contract:
- ``template/`` is copied into ``NAME/``; files named ``*.jinja`` are rendered with Jinja2 (StrictUndefined,
  trailing newline kept) and lose the suffix; every other file is copied byte for byte.
- ``template/src/project/`` becomes ``src/<package>/`` (its code uses relative imports: the rename is free).
- ``configs/`` (the presets) is copied to ``NAME/configs/`` as is.
- Caches (``__pycache__``, ``*.pyc``, ``.pytest_cache``, ``.ruff_cache``) are skipped.

Everything is validated and rendered in memory before the first byte is written, so bad input leaves no
partial output. A new project is written into a temporary folder next to the target and renamed into place.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import jinja2

from . import __version__
from .errors import AmptplError
from .resources import configs_root, template_root

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# PEP 508 distribution name.
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
# Third-party modules the generated project imports (or is run with): a package with one of these names would
# shadow it inside the project (`import torch` would find the project's own package first under src/).
IMPORTED_BY_PROJECT = frozenset(
    {"torch", "accelerate", "datasets", "evaluate", "typer", "rich", "yaml", "numpy", "pytest", "amptpl"}
)
SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"})
SKIP_SUFFIXES = (".pyc", ".pyo")
JINJA_SUFFIX = ".jinja"
MANIFEST = ".amptpl.json"
# A Jinja marker that survived rendering. `${{ ... }}` is a GitHub Actions expression, not Jinja: a workflow
# rendered through `{% raw %}` keeps it legitimately.
LEFTOVER_RE = re.compile(r"(?<!\$)\{\{|\{%")


@dataclass(frozen=True)
class RenderResult:
    """What ``render_project`` wrote: the project folder, its import package and its files (relative)."""

    path: Path
    package: str
    files: list[Path]


@dataclass(frozen=True)
class _Planned:
    data: bytes
    executable: bool = False


def package_name(name: str) -> str:
    """Validate a project (distribution) name and return its import package name.

    ``my-proj`` -> ``my_proj``. Raises ``AmptplError`` with one line saying what is wrong and what is allowed.
    """
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name) or ".." in name:
        raise AmptplError(
            f"project name {name!r} must be a plain name, not a path (no '/', '\\' or '..'); "
            "use --dir to choose where the project goes"
        )
    if not NAME_RE.match(name):
        raise AmptplError(
            f"invalid project name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting and ending with a letter or digit (e.g. my-proj)"
        )
    package = re.sub(r"[-.]", "_", name.lower())
    if not package.isidentifier():
        raise AmptplError(
            f"project name {name!r} gives package {package!r}, which is not a Python identifier; "
            "start the name with a letter"
        )
    if keyword.iskeyword(package):
        raise AmptplError(
            f"project name {name!r} gives package {package!r}, which is a Python keyword; choose another name"
        )
    if package in sys.stdlib_module_names:
        raise AmptplError(
            f"project name {name!r} gives package {package!r}, which would shadow the standard-library "
            f"module {package!r}; choose another name (e.g. {package}-train)"
        )
    if package in IMPORTED_BY_PROJECT:
        raise AmptplError(
            f"project name {name!r} gives package {package!r}, which would shadow the {package!r} package "
            f"the project imports; choose another name (e.g. my-{package})"
        )
    return package


def render_project(name: str, parent_dir: str | os.PathLike[str] = ".", force: bool = False) -> RenderResult:
    """Render the template into ``parent_dir/name`` and return what was written.

    Refuses (``AmptplError``, nothing written) an invalid name, a target that is a file, and a non-empty
    target unless ``force``. With ``force`` the template's files are overwritten and the user's other files
    are left alone.
    """
    package = package_name(name)
    parent = Path(parent_dir).expanduser()
    if parent.exists() and not parent.is_dir():
        raise AmptplError(f"--dir {parent} is not a directory")
    target = parent / name
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise AmptplError(f"{target} exists and is not a directory; choose another name or --dir")
        if not force and any(target.iterdir()):
            raise AmptplError(
                f"{target} exists and is not empty; use --force to overwrite the template's files in it "
                "(your other files are kept)"
            )

    planned = plan_files(name, package, force)
    if target.is_dir():
        _check_no_collisions(target, planned)
        _write_in_place(target, planned)
    else:
        _write_new(target, planned)
    return RenderResult(path=target, package=package, files=sorted(Path(p) for p in planned))


def plan_files(name: str, package: str, force: bool = False) -> dict[PurePosixPath, _Planned]:
    """Render every output file in memory: relative path -> content. Raises if the template is broken."""
    context = {"project_name": name, "package": package, "amptpl_version": __version__}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    planned: dict[PurePosixPath, _Planned] = {}

    def add(rel: PurePosixPath, item: _Planned, source: str) -> None:
        if rel in planned:
            raise AmptplError(f"template bug: {source} and another source both write {rel}")
        planned[rel] = item

    for parts, entry in iter_files(template_root()):
        rel_parts = list(parts)
        if len(rel_parts) > 2 and rel_parts[0] == "src" and rel_parts[1] == "project":
            rel_parts[1] = package
        source = "template/" + "/".join(parts)
        if rel_parts[-1].endswith(JINJA_SUFFIX):
            rel_parts[-1] = rel_parts[-1].removesuffix(JINJA_SUFFIX)
            text = _render_one(env, entry, context, source)
            if match := LEFTOVER_RE.search(text):
                line = text.count("\n", 0, match.start()) + 1
                raise AmptplError(f"template bug: {source} line {line} still contains {match.group()!r}")
            add(PurePosixPath(*rel_parts), _Planned(text.encode("utf-8")), source)
        else:
            add(PurePosixPath(*rel_parts), _Planned(entry.read_bytes(), _is_executable(entry)), source)

    for parts, entry in iter_files(configs_root()):
        add(PurePosixPath("configs", *parts), _Planned(entry.read_bytes()), "configs/" + "/".join(parts))

    manifest = {
        "template_version": __version__,
        "project_name": name,
        "package": package,
        "answers": {"name": name, "force": force},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    add(PurePosixPath(MANIFEST), _Planned((json.dumps(manifest, indent=2) + "\n").encode()), "amptpl")
    return planned


def iter_files(
    root: Traversable, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Traversable]]:
    """Yield ``(relative parts, file)`` for every file under ``root``, sorted, caches skipped."""
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            if entry.name not in SKIP_DIRS:
                yield from iter_files(entry, (*prefix, entry.name))
        elif entry.is_file() and not entry.name.endswith(SKIP_SUFFIXES):
            yield (*prefix, entry.name), entry


def _render_one(env: jinja2.Environment, entry: Traversable, context: dict, source: str) -> str:
    try:
        return env.from_string(entry.read_text(encoding="utf-8")).render(context)
    except jinja2.TemplateError as exc:  # a broken template is our bug: say where, in one line
        lineno = getattr(exc, "lineno", None)
        where = f" line {lineno}" if lineno else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AmptplError(f"template bug: {source}{where}: {first}") from exc


def _is_executable(entry: Traversable) -> bool:
    return isinstance(entry, Path) and bool(entry.stat().st_mode & 0o111)


def _check_no_collisions(target: Path, planned: dict[PurePosixPath, _Planned]) -> None:
    """In an existing folder, every output path must be free or a file, and every parent free or a folder."""
    for rel in planned:
        path = target / rel
        if path.is_dir():
            raise AmptplError(
                f"cannot write {path}: a directory is in the way; move it or choose another --dir"
            )
        for parent in path.relative_to(target).parents:
            existing = target / parent
            if parent != Path(".") and existing.exists() and not existing.is_dir():
                raise AmptplError(
                    f"cannot write {path}: {existing} is a file, not a directory; "
                    "move it or choose another --dir"
                )


def write_atomic(path: Path, data: bytes, executable: bool = False) -> None:
    """Write through a temporary name and rename, so a file is either old or new, never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.amptpl-tmp")
    tmp.write_bytes(data)
    if executable:  # give execute permission wherever read permission is set, like `chmod +x`
        mode = tmp.stat().st_mode
        tmp.chmod(mode | ((mode & 0o444) >> 2))
    os.replace(tmp, path)


def _write_in_place(target: Path, planned: dict[PurePosixPath, _Planned]) -> None:
    for rel, item in planned.items():
        write_atomic(target / rel, item.data, item.executable)


def _write_new(target: Path, planned: dict[PurePosixPath, _Planned]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the user's umask, not 0o700.
    staging = target.parent / f".{target.name}.amptpl-tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_in_place(staging, planned)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
