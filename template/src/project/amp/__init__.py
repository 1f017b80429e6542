"""The AMP core: one :class:`AmpSession` around your Accelerator, built from small modules you can also use alone.

A copyable folder: it imports only the standard library, torch, accelerate, rich and itself. In a plain
Accelerate loop (``amptpl add`` prints this as a diff against Accelerate's ``nlp_example.py`` shape):

    try:
        from .amp import AmpSession
    except ImportError:
        from amp import AmpSession
    amp = AmpSession(args.mixed_precision, "runs/example", checkpoint_every=20, cpu=args.cpu)
    accelerator = amp.accelerator
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = amp.prepare(
    amp.resume("auto")
    for epoch in range(amp.epoch, num_epochs):
        for step, batch in enumerate(amp.batches(train_dataloader)):
            amp.after_step(loss)
    amp.close()

That is: pick fp32/bf16/fp16 for this device and say why (``auto`` follows ``accelerate launch --mixed_precision``);
a real CPU GradScaler for fp16 on a CPU; resume exactly (step, data position, scaler across precisions, RNG); the
loss scale and skipped steps on the console and in ``metrics.jsonl``; SIGTERM saves and exits 0; the collapse guard
stops a run whose loss scale collapsed (exit 3, with a checkpoint and a diagnosis); ``close()`` saves the last step
and writes ``amp_summary.json``. Forward, backward, clipping and ``optimizer.step()`` stay in your loop.

The modules: ``precision`` (resolve, GradScalerKwargs, CPU fp16 scaler, fp32 regions, TF32), ``monitor`` (loss
scale and overflow statistics), ``guard`` (the collapse-guard policy), ``checkpoint`` (atomic save/load across
precisions), ``console`` (rich live panel or plain lines), ``session`` (all of them around one Accelerator).
"""

__version__ = "0.1.0"  # the amptpl release this core comes from

from . import checkpoint, console, distributed, guard, monitor, precision, session  # noqa: E402
from .guard import GuardFallback, GuardPolicy, GuardStop  # noqa: E402
from .session import AmpSession, RunLockedError, StopTraining  # noqa: E402

__all__ = [
    "AmpSession", "GuardFallback", "GuardPolicy", "GuardStop", "RunLockedError", "StopTraining",
    "checkpoint", "console", "distributed", "guard", "monitor", "precision", "session",
]
