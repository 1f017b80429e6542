"""Checks that a loop the core did not write uses mixed precision correctly, at no per-step device read.

They watch the session's own Accelerator and the optimizers it prepared (attributes of those objects, nothing
process-wide) and report what would otherwise fail silently:

- fp16: the loss went through ``loss.backward()`` instead of ``accelerator.backward(loss)`` (gradients never scaled,
  then unscaled: the update is ``init_scale`` times too small), or the weights were updated without
  ``optimizer.step()`` of a prepared optimizer (scaled gradients applied as they are, the scale never updated);
  both are a :class:`LoopError` at the first step where they happen (at the unscale, the optimizer step or
  ``after_step``, whichever comes first);
- fp16: gradients made smaller between backward and the optimizer step while still scaled, as
  ``torch.nn.utils.clip_grad_norm_`` does when called before unscaling (it then clips ``scale`` times too hard):
  a warning, from the first few steps (two gradient norms each, kept on the device, read at the first log tick);
- several processes: every process trained on the same first batch (the data is not split between them): a
  warning, from a fingerprint of each process's first batch (its first loss, for batches without a tensor)
  exchanged in the tick's collective.
"""

from __future__ import annotations

from typing import Any

import torch

from .position import LoopError

CHECKED_STEPS = 3  # steps whose gradient norms are compared (two norms each); later steps cost nothing


def _grad_norm(optimizer: Any) -> torch.Tensor | None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


class LoopChecks:
    """Installed by the session on its accelerator and prepared optimizers; see the module docstring."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.scaler = accelerator.scaler if accelerator.scaler is not None and accelerator.scaler.is_enabled() else None
        self.backwards = 0  # accelerator.backward calls
        self.steps = 0  # optimizer steps that went through a prepared optimizer (and so through the GradScaler)
        self._checked = 0
        self._norms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (after backward, at step, scale)
        self._after_backward: torch.Tensor | None = None
        self._seen = (0, 0)  # (backwards, steps) at the previous optimizer step
        self.warned: set[str] = set()
        self._wrap_backward()

    # ------------------------------------------------------------------ wrapping (per object, never global)

    def _wrap_backward(self) -> None:
        acc = self.accelerator
        backward = acc.backward

        def checked_backward(loss: Any, **kwargs: Any) -> Any:
            out = backward(loss, **kwargs)
            self.backwards += 1
            if self.scaler is not None and self._checked < CHECKED_STEPS and acc.sync_gradients:
                self._after_backward = self._norm_now()
            return out

        acc.backward = checked_backward
        unscale = acc.unscale_gradients

        def checked_unscale(*args: Any, **kwargs: Any) -> Any:
            if acc.sync_gradients:  # clip_grad_norm_ comes here first
                self._require_backward()
            return unscale(*args, **kwargs)

        acc.unscale_gradients = checked_unscale

    def _require_backward(self) -> None:
        if self.scaler is not None and self.backwards == self._seen[0]:
            raise LoopError("fp16: the loss did not go through accelerator.backward(loss) in this step "
                            "(loss.backward() skips the loss scaling, so the GradScaler would unscale gradients that "
                            "were never scaled); call accelerator.backward(loss)")

    def wrap_optimizers(self) -> int:
        """Watch every optimizer the accelerator prepared (idempotent); returns how many were new."""
        new = 0
        for opt in self.accelerator._optimizers:
            if getattr(opt, "_amp_checked", False):
                continue
            new += 1
            step = opt.step

            def checked_step(*args: Any, __opt=opt, __step=step, **kwargs: Any) -> Any:
                if __opt.gradient_state.sync_gradients:
                    self._before_step(__opt)
                return __step(*args, **kwargs)

            opt.step = checked_step
            opt._amp_checked = True
        return new

    def _norm_now(self) -> torch.Tensor | None:
        opts = self.accelerator._optimizers
        norms = [n for n in (_grad_norm(o) for o in opts) if n is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    def _before_step(self, opt: Any) -> None:
        self._require_backward()
        self.steps += 1
        if self.scaler is None or self._checked >= CHECKED_STEPS or self._after_backward is None:
            return
        inner = getattr(opt, "optimizer", opt)
        stage = self.scaler._per_optimizer_states[id(inner)]["stage"]
        if getattr(stage, "name", str(stage)) == "READY":  # nobody unscaled yet: the gradients are still scaled
            now = self._norm_now()
            if now is not None and getattr(self.scaler, "_scale", None) is not None:
                self._norms.append((self._after_backward, now, self.scaler._scale.detach().clone()))
        self._checked += 1
        self._after_backward = None

    # ------------------------------------------------------------------ checks

    def after_step(self) -> None:
        """At each optimizer step (gradients synced): the errors that must stop a run at once (fp16 only)."""
        if self.scaler is None:
            return
        if self.wrap_optimizers():  # prepared by accelerator.prepare directly: watched from the next step on
            self._seen = (self.backwards, self.steps)
            return
        self._require_backward()
        steps = self._seen[1]
        self._seen = (self.backwards, self.steps)
        if self.steps == steps:
            raise LoopError("fp16: the optimizer step did not go through the GradScaler: the weights changed without "
                            "optimizer.step() of an optimizer passed to amp.prepare (fp16 needs it to unscale the "
                            "gradients, skip overflowing steps and update the loss scale)")

    def at_tick(self) -> list[str]:
        """Warnings for the first log tick (one device read of the few norms kept)."""
        out = []
        if self._norms and "clip" not in self.warned:
            values = torch.stack([torch.stack([a.float(), b.float(), s.float().reshape(())])
                                  for a, b, s in self._norms]).tolist()
            self._norms.clear()
            shrunk = [(a, b, s) for a, b, s in values if b < a * 0.999]
            if shrunk:
                a, b, s = shrunk[0]
                self.warned.add("clip")
                out.append(f"warning: fp16: the gradients were made smaller while still scaled by the loss scale ({s:g}):"
                           f" norm {a:.4g} after backward, {b:.4g} at the optimizer step. Clipping before unscaling "
                           "clips them that many times too hard; use accelerator.clip_grad_norm_(...) (it unscales "
                           "first), or call accelerator.unscale_gradients() before torch.nn.utils.clip_grad_norm_")
        return out

    def same_data_warning(self, fingerprints: list[float], world: int) -> str | None:
        """The warning for first batches that are equal on every process, once."""
        if world < 2 or "data" in self.warned or len(fingerprints) != world:
            return None
        self.warned.add("data")
        if len(set(fingerprints)) == 1:
            return (f"warning: all {world} processes trained on the same first batch: the data is not split between "
                    "them (each does the same work). Pass your DataLoader through amp.prepare so Accelerate shards it,"
                    " or give each process its own part (accelerator.process_index, accelerator.num_processes)")
        return None
