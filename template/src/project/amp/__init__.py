"""The AMP core: one :class:`AmpSession` around your Accelerator, built from small modules you can also use alone.

A copyable folder: it imports only the standard library, torch, accelerate, rich and itself. In a plain
Accelerate loop (``amptpl add`` prints this as a diff against Accelerate's ``nlp_example.py`` shape):

    try:
        from .amp import AmpSession
    except ImportError:
        from amp import AmpSession
    amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=20, cpu=args.cpu)
    accelerator = amp.accelerator
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = amp.prepare(
    amp.resume("auto")
    for epoch in amp.epochs(num_epochs):
        for step, batch in enumerate(amp.batches(train_dataloader)):
            amp.after_step(loss)
    amp.close()

The contract with a loop, the same for every loop shape:

- The loop gives the session its objects (``amp.prepare(model, optimizer, loaders, scheduler)``), its batches
  (``amp.batches(x)`` for any iterable: a DataLoader, a ``range`` of offsets, a list, a new generator each epoch),
  and each optimizer step (``amp.after_step(loss, grad_norm=None, **values)``, after ``optimizer.step()``; your own
  ``values`` are logged and shown). State of its own that must survive a resume goes through ``amp.track(obj)``.
- The session gives back ``amp.step``, ``amp.epoch``, ``amp.scale`` and a stop decision: ``after_step`` returns
  True (and ``amp.should_stop`` says so) once a stop signal or the collapse guard ended the run, its state already
  saved. ``amp.batches`` and ``amp.epochs`` then end, so a loop over them ends by itself; a loop of its own checks
  the returned value. ``amp.close()`` saves the last step, writes the summary, and says how to resume.
- Forward, loss, ``accelerator.backward``, clipping and ``optimizer.step()`` stay in the loop, where you see them.

Why a decision and not an exception: a stop is not an error, and an exception raised from inside your step would
skip your own ``except KeyboardInterrupt`` and ``finally`` blocks and whatever your script does after its loop (a
last evaluation, saving the model). Exit statuses stay right for a script that does nothing about stops: a stop
signal ends with status 0 when the script ends; after the collapse guard, ``close()`` ends the process with status
3; and a loop that calls ``after_step`` again after a stop is ended there, with the same status.

Nothing process-wide is changed unless asked: the session installs its signal handlers for the run and restores
them at ``close()``; it watches only its own Accelerator and the objects you pass it. ``distributed.run_main`` is
the explicit call for a clean process end after multi-process gloo runs.

The modules: ``precision`` (resolve, GradScalerKwargs, CPU fp16 scaler, fp32 regions, TF32), ``autopick`` (``auto``
by measurement), ``master`` (bf16-true's float32 master weights), ``monitor`` (loss scale and overflow statistics),
``guard`` (the collapse-guard policy), ``checkpoint`` (atomic save/load across precisions), ``position`` (data
position, batches from any iterable), ``rundir`` (lock, fresh starts), ``signals`` (stop signals, data-loader
workers), ``loopcheck`` (fp16 mistakes of a loop), ``console`` (rich live panel or plain lines), ``tracking``
(metrics.jsonl and trackers), ``distributed``, ``defaults`` (the shared facts, without torch), the debugger's
``locate`` (which module overflowed), ``audit`` (what precision each tensor has), ``meters`` (headroom, underflow,
lost updates at log ticks) and ``numerics`` (errors against a float32 shadow), and ``session`` (all of them around
one Accelerator).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the amptpl release this core comes from

# Loaded on first use, so that the torch-free modules (defaults, guard) import without torch: a project's config
# reads its defaults from them and reports a bad key before torch loads.
_EXPORTS = {
    "AmpSession": "session", "LoopError": "position", "Stop": "session", "StopTraining": "session",
    "RunLockedError": "rundir", "OutputDirError": "rundir",
    "GuardFallback": "guard", "GuardPolicy": "guard", "GuardStop": "guard", "run_main": "distributed",
    "AuditError": "audit", "MasterWeights": "master", "OverflowLocator": "locate",
}
_MODULES = ("audit", "autopick", "checkpoint", "console", "defaults", "distributed", "guard", "locate", "loopcheck",
            "master", "meters", "monitor", "numerics", "position", "precision", "rundir", "session", "signals",
            "tracking")

__all__ = [*_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
