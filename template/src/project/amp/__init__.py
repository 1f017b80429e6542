"""The AMP core: one :class:`AmpSession` around your Accelerator. It imports only the standard library, torch,
accelerate, rich and itself; ``debug/`` (audit, meters, locate, numerics, autopick, loop checks) may be left out.
The 12 lines that put a script shaped like Accelerate's ``nlp_example.py`` under it (``amptpl add`` prints the diff):

    try:
        from .amp import AmpSession
    except ImportError:
        from amp import AmpSession
    amp = AmpSession(args.mixed_precision, "runs/example", checkpoint_every=20, cpu=args.cpu)
    accelerator = amp.accelerator
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = amp.prepare(
    amp.resume("auto")
    for epoch in amp.epochs(num_epochs):
        for step, batch in enumerate(amp.batches(train_dataloader)):
            amp.after_step(loss)          # after optimizer.step(); True once the run stopped, its state saved
    amp.close()                           # the final checkpoint and summary; returns the exit status

A stop is a value (``amp.stop``: a signal's or the collapse guard's, its exit status, the precision a fallback asks
for): a loop that leaves its loops when ``after_step`` returns True goes on to its own code; one that does not look
is ended at its next call into the session, with that status. ``max_steps`` is a budget the session keeps.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the amptpl release this core comes from

# Loaded on first use: the torch-free settings import without torch (a project's config checks keys before it).
_EXPORTS = {"AmpSession": "session", "AmpSettings": "settings", "ScalerSettings": "settings",
            "GuardSettings": "settings", "AutoSettings": "settings", "SettingsError": "settings", "Stop": "monitor",
            "LoopError": "position", "RunLockedError": "rundir", "OutputDirError": "rundir", "run_main": "distributed"}
_MODULES = ("checkpoint", "console", "distributed", "hooks", "master", "monitor", "position", "precision", "rundir",
            "session", "settings")
__all__ = [*_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
