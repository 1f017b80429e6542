"""Copy the AMP core into an existing repo: ``amptpl add DEST``.

The core is ``template/src/project/amp/``: a package that imports only the standard library, torch,
accelerate, rich and itself (relative imports), so it works wherever it is dropped. It lands in
``DEST/amp/``. A file that already exists with other content is never overwritten without ``force``;
identical files are left as they are. ``DEST/amp/.amptpl.json`` records the template version and a hash of
every file copied, so a later update can tell the user's edits from ours.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, recipe
from .errors import AmptplError
from .render import iter_files, write_atomic
from .resources import template_root

CORE_PARTS = ("src", "project", "amp")
MANIFEST = ".amptpl.json"

# Printed after `amptpl add`: the integration as diffs from plain example scripts to the same scripts using
# the core, built from amptpl/recipes/ by recipe.py (tests/test_recipe.py applies the printed diff and trains).
SNIPPET = recipe.render()


@dataclass(frozen=True)
class AddResult:
    """What ``add_core`` did: the ``amp/`` folder, the files written and the files already identical."""

    path: Path
    files: list[Path]
    unchanged: list[Path]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_core(dest: str | os.PathLike[str], force: bool = False) -> AddResult:
    """Copy the AMP core into ``dest/amp/``; return the files written (relative to ``dest/amp``).

    Refuses (``AmptplError``, nothing written) when ``dest`` is not a directory or when a destination file
    exists with different content, naming the first such file, unless ``force``.
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

    sources = {Path(*parts): entry.read_bytes() for parts, entry in iter_files(core)}
    to_write: list[Path] = []
    unchanged: list[Path] = []
    conflicts: list[Path] = []
    for rel, data in sources.items():
        path = amp_dir / rel
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if path.is_dir() or (blocker is not None and blocker != path):
            raise AmptplError(f"cannot write {path}: {blocker or path} is in the way; move it away first")
        if not path.exists():
            to_write.append(rel)
        elif path.read_bytes() == data:
            unchanged.append(rel)
        else:
            conflicts.append(rel)
    if conflicts and not force:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise AmptplError(
            f"{amp_dir / conflicts[0]} already exists with different content{more}; "
            "use --force to overwrite it with amptpl's copy"
        )
    to_write = sorted(to_write + conflicts)

    for rel in to_write:
        write_atomic(amp_dir / rel, sources[rel])
    manifest = {
        "template_version": __version__,
        "source": "amptpl/template/" + "/".join(CORE_PARTS),
        "files": {rel.as_posix(): _sha256(data) for rel, data in sorted(sources.items())},
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(amp_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return AddResult(path=amp_dir, files=[*to_write, Path(MANIFEST)], unchanged=sorted(unchanged))
