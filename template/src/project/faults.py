"""Faults of the machine told apart from bugs: a full disk, memory that ran out, a process of the run that died."""

import errno
import re

from .amp.distributed import peer_lost

_OOM = re.compile(r"out of memory|not enough memory|you tried to allocate (\d+) bytes", re.I)


def describe(e: BaseException) -> str | None:
    """One line for a fault of the machine, or None when ``e`` is not one."""
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OOM.search(str(e))):
        m = re.search(r"allocate (\d+) bytes", str(e))
        asked = f" (an allocation of {int(m.group(1)) / 2**30:.1f} GiB)" if m else ""
        return f"out of memory{asked}: a smaller model or batch, or a machine with more memory"
    if peer_lost(e):  # alone, there is no peer
        return f"{peer_lost(e)}, and the same command resumes from the last complete checkpoint"
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return f"no space left on device{f': {e.filename}' if e.filename else ''}"
        return str(e)
    return None


def write_status(e: OSError) -> int:
    """2 for a write the user's path or permissions refused (fix the input), 1 for the machine's fault (a full disk)."""
    fixable = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR)
    return 2 if e.errno in fixable else 1
