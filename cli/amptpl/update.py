"""Bring a generated project up to the installed template: ``amptpl update [PROJECT]``.

The template is rendered again with the answers recorded in ``.amptpl.json``; then each file is decided by
comparing three versions: the *base* (what amptpl wrote last time, kept in ``.amptpl/base.zip``), *yours* (the
file now) and *theirs* (today's render):

| yours vs base | theirs vs base | action |
| --- | --- | --- |
| same | changed | replace |
| changed | same | keep yours |
| changed | changed | merge (three-way; conflict markers where both changed the same lines) |
| (no base: new template file) | | add |
| deleted | | stay deleted |
| same | (dropped by the template) | remove |
| changed | (dropped by the template) | keep (template dropped it) |

The whole plan, merges included, is computed in memory before anything is written. Each file is then
written to a temporary name and renamed, so an interrupted update leaves every file old or new, and the base
and ``.amptpl.json`` are replaced last (see ``manifest``). Before the first write, ``.amptpl/pending.json``
records the hash each file is about to get: run again after an interruption, a file that already has it is
taken as done (a merged file cannot be merged a second time against the old base). The same engine
upgrades a copied AMP core (``amptpl add`` run again, see ``add``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path, PurePosixPath

from rich import box
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import AmptplError
from .manifest import (
    BASE,
    MANIFEST,
    STATE_DIR,
    FileData,
    backup_path,
    base_damage,
    commit,
    is_executable,
    load_base,
    read_manifest,
    recorded_hashes,
    sha256,
    write_atomic,
)
from .merge import is_binary, merge3
from .render import DEFAULT_EXAMPLE, NAME_RE, examples, plan_files

NEW_SUFFIX = ".amptpl-new"
PENDING = f"{STATE_DIR}/pending.json"


class Action(Enum):
    """What ``update`` does to one file; the value is what the plan table shows."""

    UP_TO_DATE = "up to date"
    REPLACE = "replace"
    KEEP = "keep yours"
    MERGE = "merge"
    CONFLICT = "conflict"
    ADD = "add"
    STAY_DELETED = "stay deleted"
    REMOVE = "remove"
    KEEP_DROPPED = "keep (template dropped it)"


@dataclass(frozen=True)
class Change:
    """One file's action, the content to write (``None``: not written) and a file written next to it first
    (a backup of yours, or amptpl's version when it cannot be merged into yours)."""

    path: PurePosixPath
    action: Action
    write: FileData | None = None
    beside: tuple[PurePosixPath, FileData] | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.action.value} ({self.note})" if self.note else self.action.value


@dataclass(frozen=True)
class Plan:
    """Everything an update will do to ``root``; ``apply`` carries it out."""

    root: Path
    changes: list[Change]
    base: dict[PurePosixPath, FileData]  # today's render: the base from now on
    manifest: dict  # .amptpl.json to write last (``commit`` adds "files" and "base")
    from_version: str
    to_version: str
    refresh_base: bool  # the recorded base or version is out of date even if no file changes
    journal_key: str = ""  # identifies the base this plan starts from (see ``PENDING``)
    damaged_base: str | None = None  # why .amptpl/base.zip could not be read (its files were merged without it)
    unresolved: list[PurePosixPath] = field(default_factory=list)  # files still holding an update's markers

    @property
    def shown(self) -> list[Change]:
        """The changes worth listing: all but the files that are already up to date."""
        return [c for c in self.changes if c.action is not Action.UP_TO_DATE]

    @property
    def conflicts(self) -> list[Change]:
        return [c for c in self.changes if c.action is Action.CONFLICT]

    @property
    def up_to_date(self) -> int:
        return sum(c.action is Action.UP_TO_DATE for c in self.changes)

    @property
    def writes_anything(self) -> bool:
        return self.refresh_base or any(c.write or c.beside or c.action is Action.REMOVE for c in self.changes)


def update_project(
    project: str | os.PathLike[str] = ".", *, dry_run: bool = False, force: bool = False, adopt: bool = False
) -> Plan:
    """Plan the update of ``project`` to the installed template and, unless ``dry_run``, apply it.

    Refuses (``AmptplError``, nothing written) a folder that is not an amptpl project, an unreadable manifest,
    a manifest without file hashes (unless ``adopt``: take the current files as the base), and a project with
    uncommitted git changes (unless ``force``). Returns the plan; ``plan.conflicts`` lists conflicted files.
    """
    root = Path(project).expanduser()
    if not root.is_dir():
        what = "is a file, not a project directory" if root.exists() else "does not exist"  # as amptpl run says
        raise AmptplError(f"project directory {project} {what}")
    manifest = read_manifest(root)
    name, package, example = _recorded_answers(root, manifest)
    if recorded_hashes(root, manifest) is None and not adopt:
        raise AmptplError(
            f"{root / MANIFEST} has no file hashes (the project was rendered before amptpl could update it); "
            f"run `amptpl update --adopt {project}` to take its current files as the base"
        )
    if not dry_run and not force:
        refuse_dirty(root)
    plan = plan_root(root, plan_files(name, package, example), manifest, adopt=adopt)
    if not dry_run:
        apply(plan)
    return plan


def _recorded_answers(root: Path, manifest: dict) -> tuple[str, str, str]:
    where = root / MANIFEST
    answers = manifest.get("answers")
    name = answers.get("name") if isinstance(answers, dict) else manifest.get("project_name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AmptplError(f'{where}: "answers"."name" must be the project name given to `amptpl new`, got {name!r}')
    package = manifest.get("package")
    if not isinstance(package, str) or not package.isidentifier():
        raise AmptplError(f'{where}: "package" must be a Python identifier, got {package!r}')
    example = answers.get("example", DEFAULT_EXAMPLE) if isinstance(answers, dict) else DEFAULT_EXAMPLE
    if example not in examples():  # a project of an example this amptpl does not have
        raise AmptplError(f'{where}: "answers"."example" must be one of {", ".join(examples())}, got {example!r}')
    return name, package, example


def refuse_dirty(root: Path) -> None:
    """Refuse when ``root`` is inside a git work tree with uncommitted changes under it (untracked included).

    An update then stays reviewable and undoable with git. Without git, or outside a repository: no check.
    """
    git = shutil.which("git")
    if git is None:
        return
    try:
        proc = subprocess.run(
            [git, "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True, check=False,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    if proc.returncode != 0:  # not a repository
        return
    dirty = [line for line in proc.stdout.splitlines() if line.strip()]
    if dirty:
        first = dirty[0][3:].strip()
        more = f" and {len(dirty) - 1} more" if len(dirty) > 1 else ""
        raise AmptplError(
            f"{root} has uncommitted changes ({first}{more} in `git status`); commit or stash them first so the "
            "update can be reviewed and undone, or use --force"
        )


def plan_root(root: Path, new: Mapping[PurePosixPath, FileData], manifest: dict, *, adopt: bool = False) -> Plan:
    """Decide every file of ``root`` (a project, or a copied AMP core) against today's files ``new``.

    With ``adopt`` the current files are taken as the base: a file that differs from ``new`` is replaced and
    first backed up next to itself (``NAME.amptpl-backup``).
    """
    old_hashes = recorded_hashes(root, manifest)
    if adopt or old_hashes is None:
        current = {rel: root / rel for rel in new if _is_file(root / rel)}
        base = {rel: path.read_bytes() for rel, path in current.items()}
        hashes = {rel: sha256(data) for rel, data in base.items()}
    else:
        hashes = old_hashes
        base = load_base(root, hashes)
    from_version = str(manifest.get("template_version", "?"))
    labels = ("yours", "base", f"amptpl {__version__}")
    key = _journal_key(hashes)
    pending = _read_pending(root, key)
    changes = []
    taken: set[Path] = set()
    for rel in sorted(set(new) | set(hashes)):
        done = pending.get(rel.as_posix())
        path = root / rel
        if done is not None and _is_file(path) and sha256(path.read_bytes()) == done.get("sha256"):
            changes.append(Change(rel, Action(done["action"]), note=str(done.get("note", ""))))
            continue
        change = _decide(root, rel, new.get(rel), hashes.get(rel), base.get(rel), labels, adopt, taken)
        if change is not None:
            changes.append(change)
    for change in changes:
        for rel in (change.path if change.write else None, change.beside[0] if change.beside else None):
            if rel is not None:
                _check_writable(root, rel)
    keep = {k: v for k, v in manifest.items() if k not in ("files", "base", "updated")}
    out = {**keep, "template_version": __version__, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    new_hashes = {rel: sha256(item.data) for rel, item in new.items()}
    refresh = (
        adopt
        or new_hashes != hashes
        or len(base) < len(hashes)
        or manifest.get("template_version") != __version__
        or manifest.get("base") != BASE
    )
    damaged = None if adopt or old_hashes is None else base_damage(root)
    unresolved = [rel for rel in sorted(set(new) | set(hashes)) if _has_markers(root / rel)]
    return Plan(root, changes, dict(new), out, from_version, __version__, refresh, key, damaged, unresolved)


_MARKERS = re.compile(rb"^<<<<<<< yours$.*^>>>>>>> amptpl ", re.MULTILINE | re.DOTALL)


def _has_markers(path: Path) -> bool:
    """True when ``path`` still holds the conflict markers an earlier update wrote (yours / amptpl)."""
    try:
        return _is_file(path) and _MARKERS.search(path.read_bytes()) is not None
    except OSError:
        return False


def _journal_key(hashes: Mapping[PurePosixPath, str]) -> str:
    return sha256(json.dumps({k.as_posix(): v for k, v in sorted(hashes.items())}).encode())


def _read_pending(root: Path, key: str) -> dict[str, dict]:
    """The journal an interrupted update from the same base left: {path: {"sha256", "action", "note"}}."""
    try:
        journal = json.loads((root / PENDING).read_text(encoding="utf-8"))
        if journal["from"] != key:
            return {}
        files = journal["files"]
        actions = {a.value for a in Action}
        return {k: v for k, v in files.items() if isinstance(v, dict) and v.get("action") in actions}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _decide(
    root: Path,
    rel: PurePosixPath,
    theirs: FileData | None,
    recorded: str | None,
    base: bytes | None,
    labels: tuple[str, str, str],
    adopt: bool,
    taken: set[Path],
) -> Change | None:
    path = root / rel
    if path.is_dir() and theirs is not None:
        raise AmptplError(f"cannot update {path}: it is a directory; move it away first")
    ours = path.read_bytes() if _is_file(path) else None
    if recorded is None:  # a new template file: amptpl never wrote it here
        if ours is None:
            return Change(rel, Action.ADD, write=theirs)
        if ours == theirs.data:
            return Change(rel, Action.UP_TO_DATE)
        return _beside(rel, theirs, "you have your own; amptpl's")
    if theirs is None:  # the template dropped it
        if ours is None:
            return None
        if sha256(ours) == recorded:
            return Change(rel, Action.REMOVE)
        return Change(rel, Action.KEEP_DROPPED)
    if ours is None:
        return Change(rel, Action.STAY_DELETED)
    if ours == theirs.data:
        return Change(rel, Action.UP_TO_DATE)
    if sha256(ours) == recorded:  # unchanged by you
        if not adopt:
            return Change(rel, Action.REPLACE, write=theirs)
        backup = backup_path(path, taken)
        taken.add(backup)
        keep = FileData(ours, is_executable(path))
        shown = backup.relative_to(root).as_posix()
        return Change(rel, Action.REPLACE, write=theirs, beside=(PurePosixPath(shown), keep), note=f"backup at {shown}")
    if sha256(theirs.data) == recorded:  # changed by you only
        return Change(rel, Action.KEEP)
    if base is None or is_binary(base) or is_binary(ours) or is_binary(theirs.data):
        why = "no base to merge against" if base is None else "binary"
        return _beside(rel, theirs, f"{why}; yours kept, amptpl's")
    merged = merge3(base, ours, theirs.data, labels)
    if merged.data == ours:  # your file already has the template's changes
        return Change(rel, Action.UP_TO_DATE)
    action = Action.CONFLICT if merged.conflicts else Action.MERGE
    return Change(rel, action, write=FileData(merged.data, is_executable(path)))


def _beside(rel: PurePosixPath, theirs: FileData, why: str) -> Change:
    side = rel.with_name(rel.name + NEW_SUFFIX)
    return Change(rel, Action.CONFLICT, beside=(side, theirs), note=f"{why} version is in {side.as_posix()}")


def _check_writable(root: Path, rel: PurePosixPath) -> None:
    path = root / rel
    if path.is_dir():
        raise AmptplError(f"cannot write {path}: a directory is in the way; move it away first")
    for parent in path.relative_to(root).parents:
        folder = root / parent
        if parent != Path(".") and folder.exists() and not folder.is_dir():
            raise AmptplError(f"cannot write {path}: {folder} is a file, not a directory; move it away first")


def apply(plan: Plan) -> None:
    """Write the plan: each file through a temporary name, removals after writes, base and manifest last."""
    root = plan.root
    journal = {
        c.path.as_posix(): {"sha256": sha256(c.write.data), "action": c.action.value, "note": c.note}
        for c in plan.changes
        if c.write is not None
    }
    if journal:
        data = {"from": plan.journal_key, "files": journal}
        write_atomic(root / PENDING, (json.dumps(data, indent=2) + "\n").encode())
    for change in plan.changes:
        if change.beside is not None:  # a backup exists before the original is replaced
            side, item = change.beside
            write_atomic(root / side, item.data, item.executable)
        if change.write is not None:
            write_atomic(root / change.path, change.write.data, change.write.executable)
    for change in plan.changes:
        if change.action is Action.REMOVE:
            path = root / change.path
            path.unlink(missing_ok=True)
            for parent in path.parents:  # drop folders the removal emptied, up to the root
                if parent == root or not parent.is_relative_to(root) or any(parent.iterdir()):
                    break
                parent.rmdir()
    if plan.writes_anything:
        commit(root, plan.base, plan.manifest)
    (root / PENDING).unlink(missing_ok=True)


def plan_table(plan: Plan, title: str | None = None) -> Table:
    """The plan as a two-column table (file, action), files that are already up to date left out."""
    styles = {Action.CONFLICT: "bold red", Action.MERGE: "yellow", Action.REMOVE: "magenta", Action.ADD: "green"}
    table = Table(title=title, title_justify="left", box=box.SQUARE, show_edge=True)
    table.add_column("file", overflow="fold")
    table.add_column("action", overflow="fold")
    for change in plan.shown:
        table.add_row(Text(change.path.as_posix()), Text(change.label, style=styles.get(change.action, "")))
    return table
