"""The AMP core: precision resolution, loss-scale monitor, checkpoints, console.

A copyable folder: it imports only the standard library, torch, accelerate, rich and itself. In your loop:

    from amp import precision, monitor, checkpoint
    res = precision.resolve("auto", PartialState().device); print(res.line())
    kw = precision.scaler_kwargs(65536, 2.0, 0.5, 2000)
    accelerator = Accelerator(**precision.accelerator_kwargs(res, kw))
    precision.install_cpu_fp16_scaler(accelerator, kw)            # before prepare: real fp16 on CPU
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    mon = monitor.AmpMonitor(accelerator.scaler); accelerator.register_for_checkpointing(mon)
    ckpt = checkpoint.CheckpointManager(accelerator, "runs/x", keep=3, meta=lambda: {...})
    # each optimizer step: mon.record(step, loss, grad_norm); at log ticks: accelerator.log(mon.flush(), step)
"""

from . import checkpoint, console, distributed, monitor, precision

__all__ = ["checkpoint", "console", "distributed", "monitor", "precision"]
