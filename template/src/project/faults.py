"""Faults of the machine told apart from bugs: a full disk, memory that ran out, a process of the run that died.

:func:`describe` makes one line of such an exception (exit status 1: nothing to fix in the input), else None (a bug
keeps its traceback); :func:`write_status` tells a write the user's path or permissions refused (2) from the machine's.
"""

from __future__ import annotations

import errno
import os
import re
import sys

_OOM = re.compile(r"out of memory|not enough memory|you tried to allocate (\d+) bytes", re.I)
_PEER = re.compile(r"connection (closed|reset) by peer|broken pipe|NCCL (error|communicator was aborted)|"
                   r"timed out|connection closed", re.I)


def describe(e: BaseException) -> str | None:
    """One line for a fault of the machine, or None when ``e`` is not one."""
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OOM.search(str(e))):
        m = re.search(r"allocate (\d+) bytes", str(e))
        asked = f" (an allocation of {int(m.group(1)) / 2**30:.1f} GiB)" if m else ""
        return f"out of memory{asked}: a smaller model or batch, or a machine with more memory"
    if isinstance(e, RuntimeError) and _PEER.search(str(e)) and _world_size() > 1:  # alone, there is no peer
        return _peer_line(_PEER.search(str(e)).group(0))
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return f"no space left on device{f': {e.filename}' if e.filename else ''}"
        return str(e)
    return None


_USER_FIXABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})


def write_status(e: OSError) -> int:
    """2 for a write the user's path or permissions refused (fix the input), 1 for the machine's fault (a full disk)."""
    return 2 if e.errno in _USER_FIXABLE else 1


def _world_size() -> int:
    """The run's processes: the launcher's WORLD_SIZE, else an initialised process group's, else 1."""
    try:
        return int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _peer_line(what: str) -> str:
    """Which rank this is and, with two, which one died (the only other); the launcher's env says."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return (f"another process of this run died or stopped answering ({what}); its own output says why, "
                "and the same command resumes from the last complete checkpoint")
    other = f"rank {1 - rank} of 2" if world == 2 else f"another of the {world} ranks"
    said = f"rank {1 - rank}'s" if world == 2 else "its"
    return (f"{other} died or stopped answering ({what}), so rank {rank} stops too; {said} own output says why, "
            "and the same command resumes from the last complete checkpoint")
