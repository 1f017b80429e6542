"""Checks that a loop the core did not write uses mixed precision correctly, at no per-step device read: features of
the session (``hooks.py``) naming what would otherwise fail silently (amptpl's docs, docs/copying-the-core.md)."""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..hooks import Feature
from ..position import LoopError, first_tensor

CHECKED_STEPS = 3  # steps whose gradient norms are compared (two norms each); later steps cost nothing


class LoopChecks(Feature):
    """fp16: a :class:`LoopError` where the loss skipped ``accelerator.backward`` or the weights changed without a
    prepared optimizer's ``step()``; a warning at a log tick where gradients were clipped while still scaled."""

    name = "loopcheck"

    @classmethod
    def make(cls, hooks: Any) -> LoopChecks | None:
        scaler = hooks.accelerator.scaler
        return cls(hooks) if scaler is not None and scaler.is_enabled() else None

    def __init__(self, hooks: Any):
        super().__init__(hooks)
        self.scaler = hooks.accelerator.scaler
        self.backwards = 0  # accelerator.backward calls
        self.steps = 0  # optimizer steps that went through a prepared optimizer (and so through the GradScaler)
        self._checked = 0
        self._norms: list[torch.Tensor] = []  # [norm after backward, norm at the step, scale] on the device
        self._after_backward: torch.Tensor | None = None
        self._seen = (0, 0)  # (backwards, steps) at the previous optimizer step
        self._known = 0  # prepared optimizers seen
        self._warned = False

    def after_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        self._known = len(self.hooks.accelerator._optimizers)

    def after_backward(self) -> None:
        self.backwards += 1
        if self._checked < CHECKED_STEPS and self.hooks.accelerator.sync_gradients:
            self._after_backward = self._norm_now()

    def _require_backward(self) -> None:
        if self.backwards == self._seen[0]:
            raise LoopError("fp16: the loss did not go through accelerator.backward(loss) in this step "
                            "(loss.backward() skips the loss scaling, so the GradScaler would unscale gradients that "
                            "were never scaled); call accelerator.backward(loss)")

    before_unscale = _require_backward  # clip_grad_norm_ comes here first

    def _norm_now(self) -> torch.Tensor | None:
        """The norm of every gradient of the prepared optimizers, on the device."""
        grads = [p.grad for o in self.hooks.accelerator._optimizers for g in o.param_groups for p in g["params"]
                 if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))

    def before_step(self, optimizer: Any) -> None:
        self._require_backward()
        self.steps += 1
        if self._checked >= CHECKED_STEPS or self._after_backward is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        stage = self.scaler._per_optimizer_states[id(inner)]["stage"]
        if getattr(stage, "name", str(stage)) == "READY":  # nobody unscaled yet: the gradients are still scaled
            now = self._norm_now()
            if now is not None and getattr(self.scaler, "_scale", None) is not None:
                self._norms.append(torch.stack([self._after_backward, now, self.scaler._scale.float().reshape(())]))
        self._checked += 1
        self._after_backward = None

    def at_step(self, loss: Any) -> None:
        """At each optimizer step: the errors that must stop a run at once."""
        known = len(self.hooks.accelerator._optimizers)
        if known != self._known:  # prepared by accelerator.prepare directly: watched from the next step on
            self._known, self._seen = known, (self.backwards, self.steps)
            return
        self._require_backward()
        if self.steps == 1:
            self._no_second_scaler()
        steps = self._seen[1]
        self._seen = (self.backwards, self.steps)
        if self.steps == steps:
            raise LoopError("fp16: the optimizer step did not go through the GradScaler: the weights changed without "
                            "optimizer.step() of an optimizer passed to amp.prepare (fp16 needs it to unscale the "
                            "gradients, skip overflowing steps and update the loss scale)")

    def _no_second_scaler(self) -> None:
        """Refuse the loop's own GradScaler that scaled the loss: scaled twice, unscaled once, the updates too large."""
        frame = sys._getframe(1)
        while frame is not None:
            for name, v in [*frame.f_locals.items(), *frame.f_globals.items()]:
                if (isinstance(v, torch.amp.GradScaler) and v is not self.scaler and v.is_enabled()
                        and v._scale is not None):
                    raise LoopError(f"fp16: the loss was scaled twice: your own GradScaler `{name}` scaled it, and "
                                    f"the session's scales what accelerator.backward gets; remove `{name}` and its "
                                    "scale/step/update calls (accelerator.backward(loss), optimizer.step())")
            frame = frame.f_back

    def at_tick(self, rows: list[list[float]]) -> tuple[dict[str, float], list[str]]:
        if not self._norms or self._warned:
            return {}, []
        shrunk = [(a, b, s) for a, b, s in torch.stack(self._norms).tolist() if b < a * 0.999]
        self._norms.clear()
        if not shrunk:
            return {}, []
        a, b, s = shrunk[0]
        self._warned = True
        return {}, [f"warning: fp16: the gradients were made smaller while still scaled by the loss scale ({s:g}): "
                    f"norm {a:.4g} after backward, {b:.4g} at the optimizer step. Clipping before unscaling clips "
                    "them that many times too hard; use accelerator.clip_grad_norm_(...) (it unscales first), or "
                    "call accelerator.unscale_gradients() before torch.nn.utils.clip_grad_norm_"]


class RandomAhead(Feature):
    """A warning where the first step drew a batch ahead (the global RNG moved after its last forward), untracked."""

    name = "random_ahead"

    def __init__(self, hooks: Any):
        super().__init__(hooks)
        self.state: torch.Tensor | None = None  # the CPU RNG as the last forward left it

    def after_forward(self, out: Any) -> Any:
        self.state = torch.random.get_rng_state()
        return out

    def at_step(self, loss: Any) -> None:
        if self.state is None:
            return
        moved, self.state, self.after_forward = not torch.equal(self.state, torch.random.get_rng_state()), None, None
        tracked = self.hooks.tracked
        kept = tracked is not None and any(isinstance(v, torch.Tensor) for o in tracked.objects.values()
                                           if isinstance(o, dict) for v in o.values())
        if moved and not kept:
            self.hooks.say("warning: the global RNG moved between the step's last forward and amp.after_step: a batch "
                           "drawn ahead for the next step (a prefetch) is not in the checkpoint, so a resume would "
                           "train on another; keep it with amp.track({...}) or draw it after amp.after_step",
                           style="yellow")


class SameData(Feature):
    """A warning where every process trained on the same first batch (the data not split between them): a
    fingerprint of each process's first batch (or its first loss), exchanged in the tick's collective."""

    name = "same_data"

    @classmethod
    def make(cls, hooks: Any) -> SameData | None:
        return cls(hooks) if hooks.accelerator.num_processes > 1 else None

    def __init__(self, hooks: Any):
        super().__init__(hooks)
        self.value: Any = None
        self.done = False  # a fingerprint was taken (or the warning given)

    def on_batch(self, batch: Any) -> None:
        """The fingerprint: a weighted sum of the first tensor's first elements (on its device, no sync); none for a
        batch without a tensor (an offset says nothing about the data it selects)."""
        if self.value is not None or self.done:
            return
        t = first_tensor(batch)
        if t is not None and t.numel():
            flat = t.detach().reshape(-1)[:4096].float()
            weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float32).remainder_(97).add_(1)
            self.value = (flat * weights).sum()

    def at_step(self, loss: Any) -> None:
        if self.value is None and loss is not None:  # batches without a tensor: the first loss instead
            self.value = loss.detach().float().clone() if isinstance(loss, torch.Tensor) else float(loss)

    def shared(self) -> list[float]:
        return [float("nan") if self.value is None or self.done else self.value]

    def at_tick(self, rows: list[list[float]]) -> tuple[dict[str, float], list[str]]:
        prints = [r[0] for r in rows]
        if self.done or any(p != p for p in prints):  # nan: some process has none yet
            return {}, []
        self.done = True
        if len(set(prints)) > 1:
            return {}, []
        return {}, [f"warning: all {len(rows)} processes trained on the same first batch: the data is not split "
                    "between them (each does the same work). Pass your DataLoader through amp.prepare so Accelerate "
                    "shards it, or give each process its own part (accelerator.process_index, "
                    "accelerator.num_processes)"]
