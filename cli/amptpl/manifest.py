"""What amptpl remembers about a folder it wrote: ``.amptpl.json`` and the pristine base in ``.amptpl/base/``.

A *root* is a generated project (``PROJECT/``) or a copied AMP core (``DEST/amp/``). In it:

- ``.amptpl.json``: the amptpl version, the answers (for a project), and ``files``: a sha256 of every file
  amptpl wrote, by relative path. A file whose hash still matches was not changed by the user.
- ``.amptpl/base/``: those files exactly as amptpl wrote them, the common ancestor that ``update`` merges the
  user's edits and the new template against. The installed wheel only carries today's template, so an older
  version cannot be re-rendered: the base has to be kept.

Updating the base and the manifest is the last step of any write, and survives a crash at any point: the new
base is written to ``.amptpl/base.tmp``, the old one moved to ``.amptpl/base.old``, the new one moved into
place, then ``.amptpl.json`` is replaced, then the old base removed. Readers take each base file from
whichever of ``base`` or ``base.old`` matches the hash in ``.amptpl.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import AmptplError

MANIFEST = ".amptpl.json"
STATE_DIR = ".amptpl"
BASE = f"{STATE_DIR}/base"
_BASE_OLD = f"{STATE_DIR}/base.old"
_BASE_TMP = f"{STATE_DIR}/base.tmp"


@dataclass(frozen=True)
class FileData:
    """One file's content and whether it is executable."""

    data: bytes
    executable: bool = False


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes, executable: bool = False) -> None:
    """Write through a temporary name and rename, so a file is either old or new, never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.amptpl-tmp")
    try:
        tmp.write_bytes(data)
        if executable:  # give execute permission wherever read permission is set, like `chmod +x`
            mode = tmp.stat().st_mode
            tmp.chmod(mode | ((mode & 0o444) >> 2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def backup_path(path: Path, taken: set[Path] = frozenset()) -> Path:
    """A free name next to ``path`` for a copy of it: ``NAME.amptpl-backup``, then ``-2``, ``-3``, ..."""
    candidate = path.with_name(f"{path.name}.amptpl-backup")
    n = 1
    while candidate.exists() or candidate.is_symlink() or candidate in taken:
        n += 1
        candidate = path.with_name(f"{path.name}.amptpl-backup-{n}")
    return candidate


def is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o111)


def read_manifest(root: Path, what: str = "amptpl project") -> dict:
    """``root/.amptpl.json`` as a dict; one-line ``AmptplError`` when it is missing or not a JSON object."""
    path = root / MANIFEST
    if not path.is_file():
        raise AmptplError(f"not an {what}: {path} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AmptplError(f"cannot read {path}: {first}") from exc
    if not isinstance(manifest, dict):
        raise AmptplError(f"{path} is not a valid amptpl manifest: expected a JSON object")
    return manifest


def recorded_hashes(root: Path, manifest: dict) -> dict[PurePosixPath, str] | None:
    """The ``files`` hashes of a manifest (``None`` when it has none), each path checked to stay inside root."""
    files = manifest.get("files")
    if files is None:
        return None
    where = root / MANIFEST
    if not isinstance(files, dict):
        raise AmptplError(f'{where}: "files" must map relative paths to "sha256:..." hashes')
    hashes = {}
    for key, value in files.items():
        rel = PurePosixPath(key)
        inside = not rel.is_absolute() and rel.parts and ".." not in rel.parts and "\\" not in key
        if not inside or rel.parts[0] == STATE_DIR or key == MANIFEST:
            raise AmptplError(f'{where}: "files" has {key!r}, which is not a relative path inside {root}')
        if not isinstance(value, str) or not value.startswith("sha256:"):
            raise AmptplError(f'{where}: "files" entry {key!r} must be a "sha256:..." hash, got {value!r}')
        hashes[rel] = value
    return hashes


def load_base(root: Path, hashes: Mapping[PurePosixPath, str]) -> dict[PurePosixPath, bytes]:
    """The base content of each recorded file that can be found: from the base folder (or the old one left
    by an interrupted update), else the file itself when it is unchanged. Missing entries are unknown."""
    base = {}
    for rel, digest in hashes.items():
        for candidate in (root / BASE / rel, root / _BASE_OLD / rel, root / rel):
            if candidate.is_file() and not candidate.is_symlink():
                data = candidate.read_bytes()
                if sha256(data) == digest:
                    base[rel] = data
                    break
    return base


def commit(root: Path, base: Mapping[PurePosixPath, FileData], manifest: dict) -> None:
    """Make ``base`` the new ``.amptpl/base/`` and write ``.amptpl.json`` (with ``files`` and ``base`` set)."""
    manifest = {**manifest, "files": {rel.as_posix(): sha256(f.data) for rel, f in sorted(base.items())}}
    manifest["base"] = BASE
    state = root / STATE_DIR
    if state.exists() and not state.is_dir():
        raise AmptplError(f"{state} is a file; amptpl keeps its base there: move it away")
    current, old, tmp = root / BASE, root / _BASE_OLD, root / _BASE_TMP
    _settle(root, current, old)
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, item in base.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        if item.executable:
            path.chmod(path.stat().st_mode | 0o111)
    if current.exists():
        os.rename(current, old)
    os.rename(tmp, current)
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    shutil.rmtree(old, ignore_errors=True)


def _settle(root: Path, current: Path, old: Path) -> None:
    """After an interrupted commit, keep whichever of base / base.old matches the manifest on disk."""
    if not old.exists():
        return
    try:
        hashes = recorded_hashes(root, read_manifest(root)) or {}
    except AmptplError:
        hashes = {}

    def matches(folder: Path) -> bool:
        return all((folder / r).is_file() and sha256((folder / r).read_bytes()) == h for r, h in hashes.items())

    if hashes and matches(old) and not (current.exists() and matches(current)):
        shutil.rmtree(current, ignore_errors=True)
        os.rename(old, current)
    else:
        shutil.rmtree(old, ignore_errors=True)
