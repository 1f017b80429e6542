"""The run's folder and how a run ends: one run per ``out_dir``, earlier runs moved aside, and the stop signals."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .distributed import any_rank

LOCK, PREVIOUS = ".lock", "previous-runs"
# what a run writes in out_dir (final/: the generated project's export); a fresh start moves these, and only these
RUN_FILES = ("checkpoints", "metrics.jsonl", "amp_summary.json", "final")
ECHO_S = 1.0  # a second SIGTERM sooner than this after the first is the same stop, forwarded by a launcher
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


class RunLockedError(RuntimeError):
    """Another live run holds ``out_dir``; the message is one line naming its PID and host."""


class OutputDirError(RuntimeError):
    """``out_dir`` cannot be created or written (a file in the way, a read-only filesystem); one line."""


class RunDir:
    """``out_dir`` for one run, locked; a refused run leaves no empty out_dir behind."""

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.path, self.held, self._created = Path(out_dir), False, []

    def acquire(self, accelerator: Any = None) -> None:
        """Take ``out_dir/.lock``; with ``accelerator``: on its main process, every process learning the outcome."""
        if accelerator is not None:
            error = None
            try:
                if accelerator.is_main_process:
                    self.acquire()
            except (RuntimeError, OSError) as e:
                error = e
            if any_rank(accelerator, error is not None):
                raise error or RunLockedError(f"{self.path} cannot be used (seen by the main process)")
            return
        lock = self.path / LOCK
        try:
            if self.path.exists() and not self.path.is_dir():
                raise OutputDirError(f"{self.path} is a file; the output directory must be a folder")
            self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # innermost first
            self.path.mkdir(parents=True, exist_ok=True)
            self.held = _acquire(lock)
        except BaseException as e:
            self._remove_created()
            if isinstance(e, IsADirectoryError):
                raise OutputDirError(f"{lock} is a directory, where the run lock (a file) goes; remove or rename it"
                                     ) from None
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # a fault of the machine, not of the path
                raise OSError(errno.ENOSPC, "no space left on device", str(self.path)) from None
            if isinstance(e, OSError):
                raise OutputDirError(f"{self.path}: cannot be used as the output directory ({e.strerror or e})"
                                     ) from None
            raise

    def release(self) -> None:
        """Remove the lock if this process holds it, then the folders :meth:`acquire` created if they are empty."""
        if self.held:
            lock, self.held = self.path / LOCK, False
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if json.loads(lock.read_text()).get("pid") == os.getpid():
                    lock.unlink()
        self._remove_created()

    def _remove_created(self) -> None:
        with contextlib.suppress(OSError):  # rmdir only when empty: the first folder that is not ends it
            for folder in self._created:
                folder.rmdir()
        self._created = []


def _acquire(path: Path) -> bool:
    """Create ``path`` with our PID and host, replacing a stale one; False when this process holds it already."""
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if path.is_dir():
                raise IsADirectoryError(path) from None
            other, pid, host = {}, -1, ""
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                other = json.loads(path.read_text())
                pid, host = int(other["pid"]), str(other["host"])
            if pid == os.getpid() and host == me["host"]:
                return False
            if pid > 0 and host == me["host"] and _alive(pid):
                raise RunLockedError(f"{path.parent} is in use by a run with PID {pid} on {host} (since "
                                     f"{other.get('started', '?')}); wait for it to finish, stop it, or use another "
                                     "output directory") from None
            if pid > 0 and host != me["host"]:
                raise RunLockedError(f"{path.parent} is in use by a run with PID {pid} on host {host}; if that run is "
                                     f"gone, delete {path}") from None
            path.unlink(missing_ok=True)  # stale: its process is gone (or the file is unreadable)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    raise RunLockedError(f"could not take the lock {path}; another run keeps creating it")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed run's process that its parent has not reaped yet (a zombie) does not."""
    try:
        with contextlib.suppress(PermissionError):  # another user's process: it runs
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): it answered, so it runs
        return True


def move_aside(out_dir: Path, why: str, also: tuple[str, ...] = ()) -> list[str]:
    """Move an earlier run's files (:data:`RUN_FILES`, ``also``) to ``previous-runs/<UTC time>/``; the notice."""
    out_dir = Path(out_dir)
    old = [out_dir / n for n in dict.fromkeys((*RUN_FILES, *also)) if n and (out_dir / n).exists()]
    if not old:
        return []
    dest = out_dir / PREVIOUS / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest.mkdir(parents=True)
    for p in old:
        os.replace(p, dest / p.name)
    return [f"{why}: the earlier run's files in {out_dir} ({', '.join(p.name for p in old)}) were moved to {dest}"]


class StopSignal:
    """A stop signal, honoured at the next step; a second one ends the process at once (Ctrl-C: KeyboardInterrupt),
    unless a SIGTERM or SIGHUP within :data:`ECHO_S` (a launcher's copy). :meth:`restore` puts the old handlers back."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signame, self._at, self._previous = None, 0.0, {}  # the first signal's name and time; handlers replaced
        with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught here
            for sig in signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup: left ignored
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signame is None:
            self.signame, self._at = signal.Signals(signum).name, time.monotonic()
            return
        if signum != signal.SIGINT and time.monotonic() - self._at < ECHO_S:
            return
        for sig in self._previous:  # nothing of ours stands in the way of a further signal
            signal.signal(sig, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.stderr.write(f"{signal.Signals(signum).name} again: ending now, without saving\n")
        os.kill(os.getpid(), signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def _worker_init(inner: Any, worker_id: int) -> None:
    """A ``worker_init_fn`` (as a picklable partial) that ignores the stop signals, then runs the loader's own."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if inner is not None:
        inner(worker_id)


def shield_workers(loader: Any) -> None:
    """Make the workers of ``loader`` ignore stop signals, which a scheduler sends the whole process group."""
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader) and getattr(loader.worker_init_fn, "func", None) is not _worker_init:
        loader.worker_init_fn = functools.partial(_worker_init, loader.worker_init_fn)
        base = getattr(loader, "base_dataloader", None)  # Accelerate's DataLoaderDispatcher keeps the original
        if base is not None and base is not loader:
            shield_workers(base)
