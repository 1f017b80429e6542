"""Copy the AMP core into an existing repo: ``amptpl add DEST``.

The core is ``template/src/project/amp/``: a package that imports only the standard library, torch,
accelerate, rich and itself (relative imports), so it works wherever it is dropped. It lands in
``DEST/amp/``. A file that already exists with other content is never overwritten without ``force`` (and
then it is backed up next to itself first); identical files are left as they are. ``DEST/amp/.amptpl.json``
records the template version and a hash of every file copied, and ``DEST/amp/.amptpl/base.zip`` keeps the
files as copied, so that running ``amptpl add DEST`` again upgrades the core the way ``amptpl update`` upgrades a
project: files you did not change are replaced, files you changed are merged (see ``update``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from . import __version__, recipe
from .errors import AmptplError
from .manifest import (
    MANIFEST,
    FileData,
    backup_path,
    commit,
    is_executable,
    read_manifest,
    recorded_hashes,
    write_atomic,
)
from .render import iter_files
from .resources import template_root
from .update import Action, Plan, apply, plan_root, refuse_dirty

CORE_PARTS = ("src", "project", "amp")


# Printed after `amptpl add`: the integration as diffs from plain example scripts to the same scripts using
# the core, built from amptpl/recipes/ by recipe.py (tests/test_recipe.py applies the printed diff and trains).
SNIPPET = recipe.render()


@dataclass(frozen=True)
class AddResult:
    """What ``add_core`` did (or, on a dry run, would do) in ``DEST/amp/``; paths relative to it.

    ``files``: written (``.amptpl.json`` included); ``unchanged``: already identical; ``backups``: on a first
    add with ``force``, each overwritten file -> its backup; ``upgrade``: the plan when ``amp/`` came from an
    earlier ``amptpl add`` (its ``.amptpl.json`` exists), else ``None``.
    """

    path: Path
    files: list[Path]
    unchanged: list[Path]
    backups: dict[Path, Path] = field(default_factory=dict)
    upgrade: Plan | None = None
    dry_run: bool = False


DEBUG = "debug"  # the core's debugger folder: what ``--minimal`` leaves out (the kernel never needs it)


def add_core(dest: str | os.PathLike[str], force: bool = False, dry_run: bool = False,
             minimal: bool | None = None) -> AddResult:
    """Copy the AMP core into ``dest/amp/``, or upgrade the copy an earlier ``add`` left there.

    ``minimal``: the kernel alone, without ``amp/debug/`` (True), or the whole core (False); None keeps what an
    earlier copy recorded (the whole core on a first copy). An upgrade to minimal removes the debugger's files you did
    not change and keeps the ones you did.

    First add: refuses (``AmptplError``, nothing written) when ``dest`` is not a directory or when a
    destination file exists with different content, naming the first such file, unless ``force`` (each such
    file is then backed up next to itself before it is overwritten).
    Upgrade (``dest/amp/.amptpl.json`` exists): unchanged files are replaced, edited ones merged (conflicts
    are in ``result.upgrade.conflicts``); refuses uncommitted git changes in ``amp/`` unless ``force``.
    ``dry_run``: the same checks and result, nothing written.
    """
    dest = Path(dest).expanduser()
    if not dest.is_dir():
        what = "is not a directory" if dest.exists() else "does not exist"
        raise AmptplError(
            f"destination {dest} {what}; give the existing package folder that should hold amp/"
        )
    core = template_root()
    for part in CORE_PARTS:
        core = core / part
    if not core.is_dir():
        raise AmptplError(f"the installed template has no {'/'.join(CORE_PARTS)}/ folder; reinstall amptpl")
    amp_dir = dest / "amp"
    if amp_dir.exists() and not amp_dir.is_dir():
        raise AmptplError(f"{amp_dir} exists and is not a directory; move it away first")

    sources = {PurePosixPath(*parts): FileData(entry.read_bytes()) for parts, entry in iter_files(core)}
    if (amp_dir / MANIFEST).exists():
        return _upgrade(dest, amp_dir, sources, force, dry_run, minimal)
    if minimal:
        sources = {rel: item for rel, item in sources.items() if rel.parts[0] != DEBUG}

    to_write: list[PurePosixPath] = []
    unchanged: list[Path] = []
    conflicts: list[PurePosixPath] = []
    for rel, item in sources.items():
        path = amp_dir / rel
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if path.is_dir() or (blocker is not None and blocker != path):
            raise AmptplError(f"cannot write {path}: {blocker or path} is in the way; move it away first")
        if not path.exists():
            to_write.append(rel)
        elif path.read_bytes() == item.data:
            unchanged.append(Path(rel))
        else:
            conflicts.append(rel)
    if conflicts and not force:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise AmptplError(
            f"{amp_dir / conflicts[0]} already exists with different content{more}; "
            "use --force to overwrite it with amptpl's copy (yours is kept as a backup next to it)"
        )
    backups = {Path(rel): backup_path(amp_dir / rel).relative_to(amp_dir) for rel in conflicts}
    files = [*sorted(Path(rel) for rel in to_write + conflicts), Path(MANIFEST)]
    if not dry_run:
        for rel in sorted(to_write + conflicts):
            path = amp_dir / rel
            if rel in conflicts:
                write_atomic(amp_dir / backups[Path(rel)], path.read_bytes(), is_executable(path))
            write_atomic(path, sources[rel].data)
        manifest = {
            "template_version": __version__,
            "source": "amptpl/template/" + "/".join(CORE_PARTS),
            "minimal": bool(minimal),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        commit(amp_dir, sources, manifest)
    return AddResult(amp_dir, files, sorted(unchanged), backups, dry_run=dry_run)


def _upgrade(
    dest: Path, amp_dir: Path, sources: dict[PurePosixPath, FileData], force: bool, dry_run: bool,
    minimal: bool | None,
) -> AddResult:
    manifest = read_manifest(amp_dir, "AMP core copied by amptpl")
    minimal = bool(manifest.get("minimal")) if minimal is None else minimal
    manifest = {**manifest, "minimal": minimal}  # kept by the plan's new manifest
    if minimal:
        sources = {rel: item for rel, item in sources.items() if rel.parts[0] != DEBUG}
    if recorded_hashes(amp_dir, manifest) is None:
        raise AmptplError(
            f'{amp_dir / MANIFEST} has no "files" hashes, so your edits cannot be told from amptpl\'s; '
            f"move it away and run `amptpl add {dest} --force` to copy the core again (your files are backed up)"
        )
    if not dry_run and not force:
        refuse_dirty(amp_dir)
    plan = plan_root(amp_dir, sources, manifest)
    if not dry_run:
        apply(plan)
    written = {Path(c.path) for c in plan.changes if c.write is not None}
    written |= {Path(c.beside[0]) for c in plan.changes if c.beside is not None}
    files = [*sorted(written), Path(MANIFEST)] if plan.writes_anything else sorted(written)
    unchanged = [Path(c.path) for c in plan.changes if c.action is Action.UP_TO_DATE]
    return AddResult(amp_dir, files, unchanged, upgrade=plan, dry_run=dry_run)
