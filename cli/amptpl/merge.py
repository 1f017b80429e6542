"""Three-way merge of one file: ``git merge-file -p`` when git is installed, else a pure-Python diff3.

Both give the same answer for the cases that matter: a change on one side only is taken, the same change on
both sides is taken once, and changes to the same lines on both sides are a conflict, written between
``<<<<<<< yours`` / ``=======`` / ``>>>>>>> amptpl`` markers with the rest of the file merged around them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path


@dataclass(frozen=True)
class Merged:
    """The merged bytes and the number of conflict regions in them (0: a clean merge)."""

    data: bytes
    conflicts: int


def is_binary(data: bytes) -> bool:
    """A file that line-based merging cannot handle: it has a NUL byte or is not UTF-8."""
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def merge3(
    base: bytes, ours: bytes, theirs: bytes, labels: tuple[str, str, str] = ("yours", "base", "amptpl"),
    use_git: bool = True,
) -> Merged:
    """Merge the changes base -> ours and base -> theirs; ``labels`` name ours, base and theirs in markers.

    Raises ``ValueError`` for binary input (see ``is_binary``): the caller decides what to do with it.
    """
    if any(is_binary(x) for x in (base, ours, theirs)):
        raise ValueError("binary files cannot be merged line by line")
    if use_git:
        merged = _git_merge_file(base, ours, theirs, labels)
        if merged is not None:
            return merged
    return _diff3(base, ours, theirs, labels)


def _git_merge_file(base: bytes, ours: bytes, theirs: bytes, labels: tuple[str, str, str]) -> Merged | None:
    git = shutil.which("git")
    if git is None:
        return None
    # merge-file needs no repository; keep a GIT_DIR from the caller's environment out of it.
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    with tempfile.TemporaryDirectory(prefix="amptpl-merge-") as tmp:
        paths = []
        for name, data in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = Path(tmp, name)
            path.write_bytes(data)
            paths.append(str(path))
        argv = [git, "merge-file", "-p", "-L", labels[0], "-L", labels[1], "-L", labels[2], *paths]
        try:
            proc = subprocess.run(argv, capture_output=True, cwd=tmp, env=env, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
    # The exit status is the number of conflicts (capped at 127); an error is negative (255 here).
    if not 0 <= proc.returncode <= 127:
        return None
    return Merged(proc.stdout, proc.returncode)


# ---------------------------------------------------------------------------------------------------- diff3
# The classic diff3 walk (as in bzr's merge3): find the runs of lines that base, ours and theirs all share
# ("sync regions"); between two of them, whichever side differs from base wins, and both differing is a
# conflict, unless both made the same change. Conflicts are then trimmed of lines common to both sides at
# their start and end, as git's "zealous" merge does, so the markers surround only what really clashes.


def _diff3(base: bytes, ours: bytes, theirs: bytes, labels: tuple[str, str, str]) -> Merged:
    z, a, b = (x.decode("utf-8").splitlines(keepends=True) for x in (base, ours, theirs))
    out: list[str] = []
    conflicts = 0
    for region in _regions(z, a, b):
        if region[0] == "lines":
            out.extend(region[1])
            continue
        _, mine, other = region
        head, mine, other, tail = _trim_common(mine, other)
        out.extend(head)
        if mine == other:  # the trim left nothing that differs
            out.extend(mine)
        else:
            conflicts += 1
            out.append(f"<<<<<<< {labels[0]}\n")
            out.extend(_terminated(mine))
            out.append("=======\n")
            out.extend(_terminated(other))
            out.append(f">>>>>>> {labels[2]}\n")
        out.extend(tail)
    return Merged("".join(out).encode("utf-8"), conflicts)


def _regions(z: list[str], a: list[str], b: list[str]) -> Iterator[tuple]:
    """Yield ``("lines", lines)`` for merged text and ``("conflict", ours, theirs)`` for clashes, in order."""
    iz = ia = ib = 0
    for zmatch, zend, amatch, aend, bmatch, bend in _sync_regions(z, a, b):
        a_part, b_part, z_part = a[ia:amatch], b[ib:bmatch], z[iz:zmatch]
        if a_part or b_part:
            if a_part == b_part:
                yield ("lines", a_part)
            elif a_part == z_part:
                yield ("lines", b_part)
            elif b_part == z_part:
                yield ("lines", a_part)
            else:
                yield ("conflict", a_part, b_part)
        # (a stretch of base deleted on both sides leaves both parts empty: nothing to emit)
        if zend > zmatch:
            yield ("lines", z[zmatch:zend])
        iz, ia, ib = zend, aend, bend


def _sync_regions(z: list[str], a: list[str], b: list[str]) -> list[tuple[int, int, int, int, int, int]]:
    """Stretches of base matched in both ours and theirs: ``(zstart, zend, astart, aend, bstart, bend)``."""
    am = SequenceMatcher(None, z, a, autojunk=False).get_matching_blocks()
    bm = SequenceMatcher(None, z, b, autojunk=False).get_matching_blocks()
    regions = []
    i = j = 0
    while i < len(am) and j < len(bm):
        az, aa, alen = am[i]
        bz, bb, blen = bm[j]
        start, end = max(az, bz), min(az + alen, bz + blen)
        if start < end:
            a0, b0 = aa + start - az, bb + start - bz
            regions.append((start, end, a0, a0 + end - start, b0, b0 + end - start))
        if az + alen < bz + blen:
            i += 1
        else:
            j += 1
    regions.append((len(z), len(z), len(a), len(a), len(b), len(b)))
    return regions


def _trim_common(a: list[str], b: list[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    m = 0
    while m < min(len(a), len(b)) - n and a[-1 - m] == b[-1 - m]:
        m += 1
    return a[:n], a[n : len(a) - m], b[n : len(b) - m], a[len(a) - m :]


def _terminated(lines: Sequence[str]) -> list[str]:
    """A conflict side whose last line has no newline gets one, so the next marker starts a line."""
    out = list(lines)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    return out
