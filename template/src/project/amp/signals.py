"""Stop signals: SIGTERM, SIGINT and SIGHUP ask a run to save and end; data-loader workers leave them to the run.

A scheduler's preemption (SLURM, Kubernetes, ``kill -- -PGID``) signals the whole process group. The data-loader
workers are in that group: left alone, they die of the signal first and the main process's next save fails with
"DataLoader worker ... is killed by signal". :func:`shield_workers` makes a loader's workers ignore the stop
signals (PyTorch already makes them ignore SIGINT); the main process saves, then shuts them down as usual.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


class StopSignal:
    """Notes a stop signal for the run to honour at its next step, instead of dying mid-step.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. :meth:`restore` puts the previous handlers
    back (the session does it when the run ends, so a Ctrl-C after an in-process run is not swallowed).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}
        for sig in signals:
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGHUP under nohup: leave it ignored
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                break

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    def restore(self) -> None:
        """Reinstall the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class _WorkerInit:
    """A DataLoader ``worker_init_fn`` that ignores the stop signals, then runs the loader's own one (picklable,
    for the spawn start method)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def shield_workers(loader: Any) -> None:
    """Make the worker processes of ``loader`` (a DataLoader, prepared or not) ignore stop signals. Idempotent;
    a no-op for anything that is not a DataLoader with workers."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or isinstance(loader.worker_init_fn, _WorkerInit):
        return
    loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)
    base = getattr(loader, "base_dataloader", None)  # Accelerate's DataLoaderDispatcher keeps the original
    if base is not None and base is not loader:
        shield_workers(base)
