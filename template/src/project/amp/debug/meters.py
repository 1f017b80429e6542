"""How close a run is to the edges of its precision (headroom, underflow, lost updates; docs/debugger.md): sampled
on the steps that end at a log tick, kept on the device until the tick reads them in one read."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..hooks import Feature

SAMPLE = 1 << 16  # sampled elements per meter, across all parameters
FP16 = torch.finfo(torch.float16)  # max 65504; tiny 2**-14, its smallest normal number: the floor of its subnormals


class Meters(Feature):
    """Gradient meters after the backward of a tick step, the lost-update meter around bf16-true's optimizer step."""

    name = "meters"

    @classmethod
    def make(cls, hooks: Any) -> Meters | None:
        return cls(hooks) if hooks.settings.meters else None

    def __init__(self, hooks: Any):
        super().__init__(hooks)
        self.armed = False  # the optimizer step being computed ends at a log tick
        self._first = True  # the next backward is the first of an optimizer step
        self._stride: int | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []  # sampled (bf16 copy, master) before the step
        self.last: dict[str, float] = {}  # as of the last tick (the run's summary)
        if hooks.resolution.weights_dtype is not None:  # bf16-true: around the optimizer's own step
            self.before_inner_step, self.after_inner_step = self._sample_masters, self._lost_updates

    def stride(self, tensors: list[torch.Tensor]) -> int:
        if self._stride is None:
            self._stride = max(1, sum(t.numel() for t in tensors) // SAMPLE)
        return self._stride

    def after_backward(self) -> None:
        """On a tick's step, sample the gradients of its first micro-batch as the backward left them (scaled, not yet
        summed over micro-batches): device work only."""
        acc = self.hooks.accelerator
        first, self._first = self._first, False
        self.armed = acc.sync_gradients and self.hooks.tick_due()
        if not (first and self.hooks.tick_due()) or acc.scaler is None or not acc.scaler.is_enabled():
            return
        grads = [p.grad for m in acc._models for p in m.parameters() if p.grad is not None and p.grad.is_floating_point()]
        if not grads:
            return
        n = self.stride(grads)
        mag = torch.cat([g.detach().reshape(-1)[::n].float() for g in grads]).abs()
        nonzero = mag > 0
        amax = torch.stack([torch.linalg.vector_norm(g.detach().float(), ord=math.inf) for g in grads]).amax()
        # finite gradients: nothing overflowed in fp16, whatever a float32 sum (a tied weight's uses) reaches: >= 0
        bits = torch.where(torch.isfinite(amax), torch.log2(FP16.max / amax).clamp(min=0), -math.inf)
        self._pending["amp/grad_underflow_frac"] = ((mag < FP16.tiny) & nonzero).sum() / nonzero.sum().clamp(min=1)
        self._pending["amp/scale_headroom_bits"] = bits

    def after_outer_step(self, opt: Any) -> None:
        self._first = True  # the next backward is the first micro-batch of the next optimizer step

    def _pairs(self, opt: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        master = self.hooks.get("master")
        return master.pairs_of(opt) if master is not None and self.armed else []

    def _sample_masters(self, opt: Any) -> None:
        pairs = self._pairs(opt)
        n = self.stride([p for p, _ in pairs]) if pairs else 1
        self._before = [(p.detach().reshape(-1)[::n].clone(), m.detach().reshape(-1)[::n].clone()) for p, m in pairs]

    def _lost_updates(self, opt: Any) -> None:
        """After the masters were updated and rounded: the share of moved masters whose bf16 copy did not change."""
        pairs = self._pairs(opt)
        if not pairs or not self._before:
            return
        moved = kept = 0
        n = self.stride([p for p, _ in pairs])
        for (p, m), (low, high) in zip(pairs, self._before, strict=True):
            changed = m.detach().reshape(-1)[::n] != high
            moved = moved + changed.sum()
            kept = kept + (changed & (p.detach().reshape(-1)[::n] == low)).sum()
        self._pending["amp/lost_update_frac"] = kept / moved.clamp(min=1)
        self._before = []

    def at_tick(self, rows: list[list[float]]) -> tuple[dict[str, float], list[str]]:
        """The values since the last tick, in one device read."""
        if not self._pending:
            return {}, []
        names = list(self._pending)
        values = torch.stack([self._pending[k].float().reshape(()) for k in names]).tolist()
        self._pending = {}
        self.last.update(zip(names, values, strict=True))
        return dict(zip(names, values, strict=True)), []

    def summary(self) -> dict[str, Any]:
        return dict(self.last)
