"""The AMP core: one :class:`AmpSession` around your Accelerator, built from small modules you can also use alone.

A copyable folder: it imports only the standard library, torch, accelerate, rich and itself. In a plain
Accelerate loop (``amptpl add`` prints this as a diff against Accelerate's ``nlp_example.py`` shape):

    from amp import AmpSession
    amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=20, cpu=args.cpu)
    accelerator = amp.accelerator
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = amp.prepare(...)
    amp.resume("auto")
    for epoch in amp.epochs(num_epochs):
        for step, batch in enumerate(amp.batches(train_dataloader)):
            ...                                   # forward, accelerator.backward, clip, optimizer.step: yours
            amp.after_step(loss)
    amp.close()

The contract with a loop, the same for every loop shape:

- The loop gives the session its objects (``amp.prepare(model, optimizer, loaders, scheduler)``), its batches
  (``amp.batches(x)`` for any iterable: a DataLoader, a ``range`` of offsets, a list, a new generator each epoch),
  and each optimizer step (``amp.after_step(loss, grad_norm=None, **values)``, after ``optimizer.step()``; your own
  ``values`` are logged and shown). State of its own that must survive a resume goes through ``amp.track(obj)``.
- The session gives back ``amp.step``, ``amp.epoch``, ``amp.scale`` and a stop decision: ``after_step`` returns
  True once a stop signal or the collapse guard ended the run, its state already saved; ``amp.stop`` then says why
  (a :class:`Stop`: its ``exit_code``, and ``to``, the precision the guard's fallback asks for).
- A stop is a value, never an exception. A loop that leaves its loops when ``after_step`` returns True goes on to
  its own code, and ``amp.close()`` returns the exit status the run asks for (0 after a signal, 3 after the guard).
  A loop that does not look is ended at its next call into the session (the next batch, epoch or ``after_step``),
  with that status: a preempted job ends within one step, whatever the loop around the core.
- Forward, loss, ``accelerator.backward``, clipping and ``optimizer.step()`` stay in the loop, where you see them.
  ``max_steps`` (a keyword of the session) is a budget the core keeps: ``amp.batches`` and ``amp.epochs`` end there,
  and a resume at or past it trains nothing.

Nothing process-wide is changed unless asked: the session installs its signal handlers for the run and restores
them at ``close()``; the only objects it wraps are the ones you pass it (``hooks.py``, in one place).

The kernel: ``settings`` (every setting, one frozen object), ``session`` (the coordinator), ``hooks`` (the one
place that wraps your objects; the features plug in there), ``precision`` (resolve, GradScalerKwargs, the CPU fp16
scaler, fp32 regions), ``master`` (bf16-true's float32 master weights), ``loopcheck`` (fp16 mistakes of a loop),
``monitor`` (loss scale and overflow statistics, the guard's policy), ``checkpoint`` (atomic save/load across
precisions), ``position`` (data position, batches from any iterable), ``rundir`` (lock, fresh starts),
``signals`` (stop signals), ``console`` (rich live panel or plain lines), ``tracking`` (metrics.jsonl and trackers)
and ``distributed`` (processes, faults). ``debug/``, which the kernel never needs: ``audit``, ``meters``,
``locate``, ``numerics`` and ``autopick``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the amptpl release this core comes from

# Loaded on first use, so that the torch-free settings import without torch: a project's config reads its defaults
# from them and reports a bad key before torch loads.
_EXPORTS = {
    "AmpSession": "session", "AmpSettings": "settings", "ScalerSettings": "settings", "GuardSettings": "settings",
    "AutoSettings": "settings", "SettingsError": "settings", "Stop": "monitor", "LoopError": "position",
    "RunLockedError": "rundir", "OutputDirError": "rundir", "run_main": "distributed",
}
_MODULES = ("checkpoint", "console", "distributed", "hooks", "loopcheck", "master", "monitor", "position",
            "precision", "rundir", "session", "settings", "signals", "tracking")

__all__ = [*_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
