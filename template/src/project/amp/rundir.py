"""One run per output directory: the lock, and a fresh start that moves an earlier run aside instead of mixing.

``out_dir/.lock`` holds the PID, host and start time of the run using the folder; a second run is refused with one
line naming them, and a lock whose process is gone (same host) is stale and taken over. A fresh start never deletes
or mixes: everything an earlier run left in ``out_dir`` moves to ``out_dir/previous-runs/<UTC time>/``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK = ".lock"
PREVIOUS = "previous-runs"


class RunLockedError(RuntimeError):
    """Another live run holds ``out_dir``; the message is one line naming its PID and host."""


class OutputDirError(RuntimeError):
    """``out_dir`` cannot be created or written (a file in the way, a read-only filesystem); one line."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """``out_dir`` for one run: :meth:`acquire` takes its lock, :meth:`release` gives it back and removes the folders
    that acquiring created when the run left nothing in them (a refused run leaves no empty out_dir behind)."""

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.path = Path(out_dir)
        self.held = False
        self._created: list[Path] = []

    def acquire(self) -> None:
        """Take ``out_dir/.lock``. Raises RunLockedError when a live run holds it, OutputDirError when the folder
        cannot be used."""
        lock = self.path / LOCK
        try:
            if self.path.exists() and not self.path.is_dir():
                raise OutputDirError(f"{self.path} is a file; the output directory must be a folder")
            missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = missing  # innermost first
            self.held = _acquire(lock)
        except IsADirectoryError:
            self._remove_created()
            raise OutputDirError(f"{lock} is a directory, where the run lock (a file) goes; remove or rename it"
                                 ) from None
        except OSError as e:
            self._remove_created()
            if e.errno == errno.ENOSPC:  # a fault of the machine, not of the path
                raise OSError(errno.ENOSPC, "no space left on device", str(self.path)) from None
            raise OutputDirError(f"{self.path}: cannot be used as the output directory ({e.strerror or e})") from None
        except RuntimeError:
            self._remove_created()
            raise

    def acquire_on_main(self, accelerator: Any) -> None:
        """:meth:`acquire` on the main process; every process learns its outcome, so none waits on the others."""
        from .distributed import any_rank

        error: Exception | None = None
        if accelerator.is_main_process:
            try:
                self.acquire()
            except (RuntimeError, OSError) as e:
                error = e
        if any_rank(accelerator, error is not None):
            raise error or RunLockedError(f"{self.path} cannot be used (seen by the main process)")

    def release(self) -> None:
        """Remove the lock if this process holds it, then the folders :meth:`acquire` created if they are empty."""
        if self.held:
            lock = self.path / LOCK
            try:
                if json.loads(lock.read_text()).get("pid") == os.getpid():
                    lock.unlink()
            except (OSError, ValueError, AttributeError):
                pass
            self.held = False
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self._created = []


def _acquire(path: Path) -> bool:
    """Create ``path`` exclusively with our PID and host; replace it when its process is gone (same host). False when
    this process holds it already (a run restarted in the same process)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if path.is_dir():
                raise IsADirectoryError(path) from None
            try:
                other = json.loads(path.read_text())
                pid, host = int(other["pid"]), str(other["host"])
            except (OSError, ValueError, KeyError, TypeError):
                other, pid, host = {}, -1, ""
            if pid == os.getpid() and host == me["host"]:
                return False
            if pid > 0 and host == me["host"] and _pid_alive(pid):
                raise RunLockedError(
                    f"{path.parent} is in use by a run with PID {pid} on {host} (since {other.get('started', '?')}); "
                    "wait for it to finish, stop it, or use another output directory") from None
            if pid > 0 and host != me["host"]:
                raise RunLockedError(
                    f"{path.parent} is in use by a run with PID {pid} on host {host}; if that run is gone, "
                    f"delete {path}") from None
            path.unlink(missing_ok=True)  # stale: its process is gone (or the file is unreadable)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    raise RunLockedError(f"could not take the lock {path}; another run keeps creating it")


def move_aside(out_dir: Path, why: str) -> list[str]:
    """Move everything an earlier run left in ``out_dir`` (checkpoints, metrics, summary, tracker logs, an export)
    to ``out_dir/previous-runs/<UTC time>/``; returns the notice (none when there was nothing)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    old = sorted(p for p in out_dir.iterdir() if p.name not in (LOCK, PREVIOUS))
    if not old:
        return []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = out_dir / PREVIOUS / stamp
    dest.mkdir(parents=True)
    for p in old:
        os.replace(p, dest / p.name)
    return [f"{why}: the earlier run's files in {out_dir} ({', '.join(p.name for p in old)}) were moved to {dest}"]
