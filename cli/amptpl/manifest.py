"""What amptpl remembers about a folder it wrote: ``.amptpl.json`` and the pristine base in ``.amptpl/base.zip``.

A *root* is a generated project (``PROJECT/``) or a copied AMP core (``DEST/amp/``). In it:

- ``.amptpl.json``: the amptpl version, the answers (for a project), and ``files``: a sha256 of every file
  amptpl wrote, by relative path. A file whose hash still matches was not changed by the user.
- ``.amptpl/base.zip``: those files exactly as amptpl wrote them, the common ancestor that ``update`` merges
  the user's edits and the new template against. The installed wheel only carries today's template, so an
  older version cannot be re-rendered: the base has to be kept. One archive, not a folder of ~50 files: one
  file to write makes ``amptpl new`` cheaper. Its entries are stored uncompressed with a fixed timestamp, so
  the same files give the same bytes (git compresses it, and an unchanged base is no change in git).
  ``unzip -l`` lists it, ``unzip -p .amptpl/base.zip PATH`` prints one file.

Updating the base and the manifest is the last step of any write, and survives a crash at any point: the old
base is moved to ``.amptpl/base.old.zip``, the new one written (to a temporary name, then renamed), then
``.amptpl.json`` is replaced, then the old base removed. Readers take each base file from whichever of
``base.zip`` or ``base.old.zip`` matches the hash in ``.amptpl.json``. A base that earlier builds of amptpl
kept as a folder (``.amptpl/base/``) is still read, and replaced by the archive at the next commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import AmptplError

MANIFEST = ".amptpl.json"
STATE_DIR = ".amptpl"
BASE = f"{STATE_DIR}/base.zip"
_BASE_OLD = f"{STATE_DIR}/base.old.zip"
# the folders an earlier amptpl kept the base in: read, and removed at the next commit
_FOLDER_BASE = f"{STATE_DIR}/base"
_FOLDER_BASE_OLD = f"{STATE_DIR}/base.old"
_FOLDER_BASE_TMP = f"{STATE_DIR}/base.tmp"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can carry: the same files give the same archive


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
        if executable:
            make_executable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_executable(path: Path) -> None:
    """Give execute permission wherever read permission is set, like ``chmod +x``."""
    mode = path.stat().st_mode
    path.chmod(mode | ((mode & 0o444) >> 2))


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
    """The base content of each recorded file that can be found: from the base archive (or the old one left
    by an interrupted update, or a base folder an earlier amptpl kept), else the file itself when it is
    unchanged. Missing entries are unknown."""
    archives = [_read_archive(root / BASE), _read_archive(root / _BASE_OLD)]
    base = {}
    for rel, digest in hashes.items():
        data = next((c for c in _candidates(root, archives, rel) if c is not None and sha256(c) == digest), None)
        if data is not None:
            base[rel] = data
    return base


def _candidates(root: Path, archives: list[dict[PurePosixPath, bytes]], rel: PurePosixPath) -> Iterator[bytes | None]:
    """Where a base file may be, in order, each read only when the ones before it did not match."""
    for archive in archives:
        yield archive.get(rel)
    for path in (root / _FOLDER_BASE / rel, root / _FOLDER_BASE_OLD / rel, root / rel):
        yield _read_file(path)


def base_damage(root: Path) -> str | None:
    """Why ``root``'s base archive cannot be read (one phrase), or None when it reads or is not there."""
    path = root / BASE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, ValueError, NotImplementedError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return f"{bad} is corrupt" if bad else None


def _read_archive(path: Path) -> dict[PurePosixPath, bytes]:
    """Every file in a base archive by relative path; empty when there is none or it cannot be read."""
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        with zipfile.ZipFile(path) as archive:
            return {PurePosixPath(i.filename): archive.read(i) for i in archive.infolist() if not i.is_dir()}
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, ValueError, NotImplementedError, RuntimeError):
        return {}  # a damaged archive is no base: update then treats those files as unknown


def _read_file(path: Path) -> bytes | None:
    if path.is_file() and not path.is_symlink():
        return path.read_bytes()
    return None


def base_archive(base: Mapping[PurePosixPath, FileData]) -> bytes:
    """``base`` as the bytes of a zip archive: sorted, uncompressed, a fixed timestamp, the permission bits."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for rel, item in sorted(base.items()):
            info = zipfile.ZipInfo(rel.as_posix(), date_time=_ZIP_TIME)
            info.external_attr = (0o100755 if item.executable else 0o100644) << 16  # a regular file's st_mode
            archive.writestr(info, item.data)
    return buffer.getvalue()


def commit(root: Path, base: Mapping[PurePosixPath, FileData], manifest: dict) -> None:
    """Make ``base`` the new ``.amptpl/base.zip`` and write ``.amptpl.json`` (with ``files`` and ``base`` set)."""
    manifest = {**manifest, "files": {rel.as_posix(): sha256(f.data) for rel, f in sorted(base.items())}}
    manifest["base"] = BASE
    state = root / STATE_DIR
    if state.exists() and not state.is_dir():
        raise AmptplError(f"{state} is a file; amptpl keeps its base there: move it away")
    current, old = root / BASE, root / _BASE_OLD
    for path in (current, old):
        if path.is_dir() and not path.is_symlink():
            raise AmptplError(f"{path} is a folder; amptpl keeps its base in that file: move it away")
    _settle(root, current, old)
    data = base_archive(base)
    state.mkdir(exist_ok=True)
    if current.exists():
        os.rename(current, old)
    write_atomic(current, data)
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    old.unlink(missing_ok=True)
    for folder in (_FOLDER_BASE, _FOLDER_BASE_OLD, _FOLDER_BASE_TMP):
        shutil.rmtree(root / folder, ignore_errors=True)


def _settle(root: Path, current: Path, old: Path) -> None:
    """After an interrupted commit, keep whichever of base.zip / base.old.zip matches the manifest on disk."""
    if not old.exists():
        return
    try:
        hashes = recorded_hashes(root, read_manifest(root)) or {}
    except AmptplError:
        hashes = {}

    def matches(path: Path) -> bool:
        archive = _read_archive(path)
        return all(rel in archive and sha256(archive[rel]) == h for rel, h in hashes.items())

    if hashes and matches(old) and not (current.exists() and matches(current)):
        current.unlink(missing_ok=True)
        os.rename(old, current)
    else:
        old.unlink(missing_ok=True)
