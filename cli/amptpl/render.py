"""Render the project template into a new folder: ``amptpl new NAME``.

The template contract:
- ``template/`` is copied into ``NAME/``; files named ``*.jinja`` are rendered with Jinja2 (StrictUndefined,
  trailing newline kept) and lose the suffix; every other file is copied byte for byte.
- ``template/src/project/`` becomes ``src/<package>/`` (its code uses relative imports: the rename is free).
- ``configs/`` (the presets) is copied to ``NAME/configs/`` as is.
- ``template/examples/EXAMPLE/`` is the example the project trains (``--example``, default ``bytelm``): its
  ``example/`` becomes ``src/<package>/example/``, its ``tests/`` and ``configs/`` join the project's. The other
  examples are not written.
- Caches (``__pycache__``, ``*.pyc``, ``.pytest_cache``, ``.ruff_cache``) are skipped.

Everything is validated and rendered in memory before the first byte is written, so bad input leaves no
partial output. A new project is written into a temporary folder next to the target and renamed into place.

Besides the rendered files, a project gets ``.amptpl.json`` (amptpl version, answers, a sha256 of every file
written) and ``.amptpl/base.zip`` (those files as written): what ``amptpl update`` merges against (``manifest``).
With ``force`` into a non-empty folder, a file that differs from the template's is backed up next to itself
(``NAME.amptpl-backup``) before it is overwritten; identical files and the user's other files are left alone.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import jinja2

from . import __version__
from .errors import AmptplError
from .manifest import (
    BASE,
    MANIFEST,
    STATE_DIR,
    FileData,
    backup_path,
    commit,
    is_executable,
    make_executable,
    read_manifest,
    recorded_hashes,
    write_atomic,
)
from .resources import configs_root, template_root

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# PEP 508 distribution name.
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
MAX_NAME = 100  # a folder and a package of that name; file systems stop at 255 bytes
# Third-party modules the generated project imports, is run or tested with, or that its dependencies import at
# run time: a package with one of these names would shadow it inside the project (`import torch` would find
# the project's own package first under src/). The distributions in the template's pyproject.toml are added
# at run time (see `_template_dependencies`).
IMPORTED_BY_PROJECT = frozenset(
    {
        "torch", "accelerate", "datasets", "evaluate", "rich", "yaml",
        "safetensors", "huggingface_hub", "numpy", "pyarrow", "tensorboard", "transformers", "packaging",
        "psutil", "tqdm", "fsspec", "filelock", "requests", "jinja2", "typer", "click", "pytest", "ruff",
        "matplotlib", "wandb", "deepspeed", "amptpl",
    }
)  # fmt: skip
SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"})
SKIP_SUFFIXES = (".pyc", ".pyo")
JINJA_SUFFIX = ".jinja"
# A Jinja marker that survived rendering. `${{ ... }}` is a GitHub Actions expression, not Jinja: a workflow
# rendered through `{% raw %}` keeps it legitimately.
LEFTOVER_RE = re.compile(r"(?<!\$)\{\{|\{%")


@dataclass(frozen=True)
class RenderResult:
    """What ``render_project`` wrote: the project folder, its import package and its files (relative).

    ``files`` are all the template's files (``.amptpl.json`` included); ``unchanged`` those that were already
    there with the same content (left alone); ``backups`` maps each overwritten file to its backup; ``moved``
    each file an earlier render wrote that this one does not (another example's) to where it was moved aside.
    """

    path: Path
    package: str
    files: list[Path]
    unchanged: list[Path] = field(default_factory=list)
    backups: dict[Path, Path] = field(default_factory=dict)
    moved: dict[Path, Path] = field(default_factory=dict)


def package_name(name: str, target: Path | None = None) -> str:
    """Validate a project (distribution) name and return its import package name.

    ``my-proj`` -> ``my_proj``. Raises ``AmptplError`` with one line saying what is wrong and what is allowed.
    A package that would shadow the standard library, a dependency of the project, or a package already
    importable here is refused (one found inside ``target``, the project itself, is not counted).
    """
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name) or ".." in name:
        raise AmptplError(
            f"project name {name!r} must be a plain name, not a path (no '/', '\\' or '..'); "
            "use --dir to choose where the project goes"
        )
    if len(name) > MAX_NAME:
        raise AmptplError(f"project name is {len(name)} characters long; use at most {MAX_NAME} (e.g. my-proj)")
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
    if package in IMPORTED_BY_PROJECT or package in _template_dependencies():
        raise AmptplError(
            f"project name {name!r} gives package {package!r}, which would shadow the {package!r} package "
            f"the project depends on; choose another name (e.g. my-{package})"
        )
    origin = _importable_elsewhere(package, target)
    if origin is not None:
        raise AmptplError(
            f"project name {name!r} gives package {package!r}, which would shadow the installed package "
            f"{package!r} ({origin}); choose another name (e.g. my-{package})"
        )
    return package


def _normalized(distribution: str) -> str:
    """A distribution name as the package name `package_name` would make of it (PEP 503, with '_')."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def _template_dependencies() -> frozenset[str]:
    """The distributions the template's pyproject.toml depends on (optional ones too), normalized."""
    try:
        text = (template_root() / "pyproject.toml.jinja").read_text(encoding="utf-8")
    except (AmptplError, OSError, UnicodeDecodeError):
        return frozenset()
    try:
        import tomllib  # 3.11+; the Jinja placeholders in this file sit inside TOML strings
    except ImportError:  # Python 3.10: the quoted requirement strings of the dependency arrays
        blocks = re.findall(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        extras = re.search(r"^\[project\.optional-dependencies\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        blocks += re.findall(r"=\s*\[(.*?)\]", extras.group(1), re.S) if extras else []
        requirements = [r for block in blocks for r in re.findall(r'"([^"]*)"', block)]
    else:
        try:
            project = tomllib.loads(text).get("project", {})
        except tomllib.TOMLDecodeError:
            return frozenset()
        requirements = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            requirements += extra
    names = (re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r) for r in requirements if isinstance(r, str))
    return frozenset(_normalized(m.group(1)) for m in names if m)


def _importable_elsewhere(package: str, target: Path | None) -> str | None:
    """Where ``package`` would be imported from in this Python, or None (not found, or only a plain folder).

    ``find_spec`` on a top-level name locates the package without importing it (torch stays unimported).
    A namespace package (a folder without ``__init__.py``, e.g. the project folder in the current directory
    under ``python -m``) and a package inside ``target`` (the project itself, installed editable) do not count.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "namespace"):
        return None
    origin = spec.origin
    if target is not None and origin not in ("built-in", "frozen"):
        try:
            if Path(origin).resolve().is_relative_to(target.resolve()):
                return None
        except OSError:
            pass
    return origin


DEFAULT_EXAMPLE = "bytelm"
EXAMPLES_DIR = "examples"


def examples() -> list[str]:
    """The examples a project can start from (``amptpl new --example``), the default first."""
    root = template_root() / EXAMPLES_DIR
    if not root.is_dir():  # a template of your own (AMPTPL_TEMPLATE_ROOT) need not have examples
        return []
    found = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith((".", "_")))
    return sorted(found, key=lambda n: n != DEFAULT_EXAMPLE)


def check_example(example: str) -> str:
    if example not in examples() and (examples() or example != DEFAULT_EXAMPLE):
        raise AmptplError(f"--example {example!r}: not an example; choose one of {', '.join(examples())}")
    return example


def render_project(name: str, parent_dir: str | os.PathLike[str] = ".", force: bool = False,
                   example: str = DEFAULT_EXAMPLE) -> RenderResult:
    """Render the template into ``parent_dir/name`` and return what was written.

    Refuses (``AmptplError``, nothing written) an invalid name, a target that is a file, and a non-empty
    target unless ``force``. With ``force`` a file that differs from the template's is backed up next to
    itself and overwritten; identical files and the user's other files are left alone.
    """
    parent = Path(parent_dir).expanduser()
    target = parent / name
    package = package_name(name, target)
    check_example(example)
    if parent.exists() and not parent.is_dir():
        raise AmptplError(f"--dir {parent} is not a directory")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise AmptplError(f"{target} exists and is not a directory; choose another name or --dir")
        if not force and any(target.iterdir()):
            raise AmptplError(
                f"{target} exists and is not empty; use --force to overwrite the template's files in it "
                "(your other files are kept)"
            )

    planned = plan_files(name, package, example)
    manifest = {
        "template_version": __version__,
        "project_name": name,
        "package": package,
        "answers": {"name": name, "example": example},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    files = sorted([Path(p) for p in planned] + [Path(MANIFEST)])
    if target.is_dir():
        _check_no_collisions(target, planned)
        moved = {rel: backup_path(target / rel).relative_to(target) for rel in _not_planned(target, planned)}
        for rel, backup in moved.items():  # another example's files: moved aside, not left to break its tests
            (target / rel).rename(target / backup)
        unchanged, backups = _write_in_place(target, planned)
        commit(target, planned, manifest)
        return RenderResult(target, package, files, unchanged, backups, moved)
    _write_new(target, planned, manifest)
    return RenderResult(target, package, files)


def plan_files(name: str, package: str, example: str = DEFAULT_EXAMPLE) -> dict[PurePosixPath, FileData]:
    """Render every output file in memory: relative path -> content. Raises if the template is broken."""
    context = {"project_name": name, "package": package, "amptpl_version": __version__, "example": example,
               "key_table": key_table(example), "example_about": "", "example_readme": ""}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    about = template_root() / EXAMPLES_DIR / example / "readme.md.jinja"  # the example's own README sections
    if about.is_file():
        parts = _render_one(env, about, context, f"template/{EXAMPLES_DIR}/{example}/readme.md.jinja").split("\n---\n")
        context.update(zip(("example_about", "example_readme"), (p.strip() for p in parts), strict=False))
    planned: dict[PurePosixPath, FileData] = {}

    def add(rel: PurePosixPath, item: FileData, source: str) -> None:
        if rel in planned:
            raise AmptplError(f"template bug: {source} and another source both write {rel}")
        if rel.parts[0] in (STATE_DIR, MANIFEST):
            raise AmptplError(f"template bug: {source} writes {rel}, which is amptpl's own bookkeeping")
        planned[rel] = item

    for parts, entry in iter_files(template_root()):
        rel_parts = destination(parts, package, example)
        if rel_parts is None:
            continue
        source = "template/" + "/".join(parts)
        if rel_parts[-1].endswith(JINJA_SUFFIX):
            rel_parts[-1] = rel_parts[-1].removesuffix(JINJA_SUFFIX)
            text = _render_one(env, entry, context, source)
            if match := LEFTOVER_RE.search(text):
                line = text.count("\n", 0, match.start()) + 1
                raise AmptplError(f"template bug: {source} line {line} still contains {match.group()!r}")
            add(PurePosixPath(*rel_parts), FileData(text.encode("utf-8")), source)
        else:
            add(PurePosixPath(*rel_parts), FileData(entry.read_bytes(), _is_executable(entry)), source)

    for parts, entry in iter_files(configs_root()):
        add(PurePosixPath("configs", *parts), FileData(entry.read_bytes()), "configs/" + "/".join(parts))
    return planned


def destination(parts: tuple[str, ...], package: str, example: str) -> list[str] | None:
    """Where the template file ``parts`` goes in a project of ``example`` (``.jinja`` still on), or None: a file
    of another example, or one beside an example's folders (its README part, read by ``plan_files``)."""
    rel = list(parts)
    if rel[0] == EXAMPLES_DIR:
        if tuple(rel[:2]) != (EXAMPLES_DIR, example) or len(rel) < 4:
            return None
        # examples/E/example/... -> src/<package>/example/...; examples/E/tests|configs/... -> tests|configs/...
        return ["src", package, *rel[2:]] if rel[2] == "example" else rel[2:]
    if len(rel) > 2 and rel[0] == "src" and rel[1] == "project":
        rel[1] = package
    return rel


def key_table(example: str) -> str:
    """The README's table of every config key, made by the template's own ``config.py`` (with ``example``'s
    sections) in a child Python: the README cannot drift from the config. Imports yaml, never torch."""
    import subprocess
    import tempfile

    if not (template_root() / "src" / "project" / "config.py").is_file():  # a template of your own without one
        return ""
    with tempfile.TemporaryDirectory(prefix="amptpl-keys-") as tmp:
        pkg = Path(tmp, "project")
        sources = [(("src", "project"), template_root() / "src" / "project"),
                   (("example",), template_root() / EXAMPLES_DIR / example / "example")]
        for base, root in sources:
            for parts, entry in iter_files(root) if root.is_dir() else ():
                if parts[-1].endswith(".py"):
                    dest = pkg.joinpath(*parts) if base[0] == "src" else pkg.joinpath("example", *parts)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(entry.read_bytes())
        proc = subprocess.run([sys.executable, "-c", "from project.config import readme_table; print(readme_table())"],
                              cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}, capture_output=True, text=True, check=False)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AmptplError(f"template bug: its config.py does not load with the {example} example ({last})")
    return proc.stdout.rstrip("\n")


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


def _check_no_collisions(target: Path, planned: dict[PurePosixPath, FileData]) -> None:
    """In an existing folder, every output path must be free or a file, and every parent free or a folder."""
    state, base = target / STATE_DIR, target / BASE  # where the base is kept
    if state.exists() and not state.is_dir():
        raise AmptplError(f"cannot write the base to {state}: it is a file; move it or choose another --dir")
    if base.is_dir() and not base.is_symlink():
        raise AmptplError(f"cannot write the base to {base}: it is a folder; move it or choose another --dir")
    for rel in [*planned, PurePosixPath(MANIFEST)]:
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


def _not_planned(target: Path, planned: dict[PurePosixPath, FileData]) -> list[Path]:
    """The files an earlier render recorded in ``target``'s manifest that this render does not write."""
    if not (target / MANIFEST).is_file():
        return []
    try:
        recorded = recorded_hashes(target, read_manifest(target)) or {}
    except AmptplError:  # a damaged manifest: nothing is known to be the template's
        recorded = {}
    return [Path(rel) for rel in recorded if rel not in planned and (target / rel).is_file()]


def _write_in_place(
    target: Path, planned: dict[PurePosixPath, FileData]
) -> tuple[list[Path], dict[Path, Path]]:
    """Write into an existing folder: identical files are left alone, a differing one is backed up first.

    Returns the unchanged files and ``{file: backup}``, relative to ``target``.
    """
    unchanged: list[Path] = []
    backups: dict[Path, Path] = {}
    for rel, item in planned.items():
        path = target / rel
        if path.is_file() and not path.is_symlink():
            old = path.read_bytes()
            if old == item.data:
                unchanged.append(Path(rel))
                continue
            backup = backup_path(path)
            write_atomic(backup, old, is_executable(path))
            backups[Path(rel)] = backup.relative_to(target)
        write_atomic(path, item.data, item.executable)
    return sorted(unchanged), backups


def _write_new(target: Path, planned: dict[PurePosixPath, FileData], manifest: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the user's umask, not 0o700.
    staging = target.parent / f".{target.name}.amptpl-tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_tree(staging, planned)
        commit(staging, planned, manifest)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_tree(root: Path, planned: dict[PurePosixPath, FileData]) -> None:
    """Write every file under ``root``, a staging folder no one sees until it is renamed into place: so each
    file is written directly (not through a temporary name of its own) and each folder is made once."""
    made: set[Path] = set()
    for rel, item in planned.items():
        path = root / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(item.data)
        if item.executable:
            make_executable(path)
