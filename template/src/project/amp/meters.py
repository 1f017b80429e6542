"""How close a run is to the edges of its precision, measured on the steps that end at a log tick only.

- ``amp/grad_underflow_frac``: of the non-zero gradient elements in a fixed sample, the share whose *scaled*
  value (as the backward computed it, times the loss scale) is below fp16's subnormal floor, its smallest normal
  number (2**-14): there fp16 keeps fewer significant bits, and below 2**-24 none (the value becomes zero). High
  means the scale is too low (or fp16 is the wrong precision for this model).
- ``amp/scale_headroom_bits``: ``log2(65504 / the largest scaled gradient)``: how many more doublings of the scale
  the gradients would take before fp16 overflows (negative: they already do; the step is skipped).
- ``amp/lost_update_frac`` (bf16-true): of the sampled weights that the optimizer moved (their float32 master
  changed), the share whose bf16 copy did not change: updates too small to show yet, kept in the master.

The first two are measured in runs with a loss scale (fp16), the third in bf16-true. Nothing is read from the
device per step: the values stay on the device from the tick's last backward (and optimizer step) until the tick
reads them, in one read. A sample is every n-th element of each tensor (n fixed per run so that at most :data:`SAMPLE` elements
are looked at), so a tick costs a few strided reductions.
"""

from __future__ import annotations

import math

import torch

SAMPLE = 1 << 16  # sampled elements per meter, across all parameters
FP16_MAX = 65504.0
FP16_TINY = 2.0**-14  # fp16's smallest normal number: the floor of its subnormal range


class Meters:
    """Gradient meters after the backward of a tick step; the lost-update meter from :class:`master.MasterWeights`."""

    def __init__(self) -> None:
        self.armed = False
        self._stride: int | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def stride(self, tensors: list[torch.Tensor]) -> int:
        if self._stride is None:
            self._stride = max(1, sum(t.numel() for t in tensors) // SAMPLE)
        return self._stride

    def after_backward(self, params: list[torch.Tensor]) -> None:
        """Sample the gradients as the backward left them: times the loss scale, before any unscaling (call it
        right after the backward). Device work only."""
        grads = [p.grad for p in params if p.grad is not None and p.grad.is_floating_point()]
        if not grads:
            return
        n = self.stride(grads)
        mag = torch.cat([g.detach().reshape(-1)[::n].float() for g in grads]).abs()
        nonzero = mag > 0
        amax = torch.stack([torch.linalg.vector_norm(g.detach().float(), ord=math.inf) for g in grads]).amax()
        amax = torch.where(torch.isfinite(amax), amax, torch.full_like(amax, math.inf))  # NaN too: overflowed
        self._pending["amp/grad_underflow_frac"] = ((mag < FP16_TINY) & nonzero).sum() / nonzero.sum().clamp(min=1)
        self._pending["amp/scale_headroom_bits"] = torch.log2(FP16_MAX / amax)

    def lost_updates(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], before: list[torch.Tensor]) -> None:
        """bf16-true, after the masters were updated and rounded: ``before`` holds (bf16 copy, master) samples."""
        moved = kept = None
        n = self.stride([p for p, _ in pairs])
        for (p, m), (low, high) in zip(pairs, zip(before[::2], before[1::2], strict=True), strict=True):
            changed = m.detach().reshape(-1)[::n] != high
            shown = p.detach().reshape(-1)[::n] != low
            moved = changed.sum() if moved is None else moved + changed.sum()
            kept = (changed & ~shown).sum() if kept is None else kept + (changed & ~shown).sum()
        if moved is not None:
            self._pending["amp/lost_update_frac"] = kept / moved.clamp(min=1)

    def sample_pairs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        n = self.stride([p for p, _ in pairs])
        return [t.detach().reshape(-1)[::n].clone() for p, m in pairs for t in (p, m)]

    def read(self) -> dict[str, float]:
        """The values since the last tick, in one device read."""
        if not self._pending:
            return {}
        names = list(self._pending)
        values = torch.stack([self._pending[k].float().reshape(()) for k in names]).tolist()
        self._pending = {}
        return dict(zip(names, values, strict=True))
