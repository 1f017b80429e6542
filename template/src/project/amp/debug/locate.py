"""Which module overflowed: hooks on one replayed training step name the first module and phase past the low-precision
limit, with a headroom table; never in normal training (``python -m PACKAGE.locate``, docs/debugger.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PHASES = ("forward", "backward", "parameter gradient")


def limit_for(precision: str) -> float:
    """The largest finite value of the precision's low-precision dtype (fp16: 65504; bf16 and fp32: their own)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16}.get(precision, torch.float32)
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class Finding:
    """The first overflow: where, in which phase, how large, and at which step (when the caller counts steps)."""

    module: str
    phase: str
    amax: float
    step: int | None = None

    def line(self, limit: float) -> str:
        what = "non-finite" if not math.isfinite(self.amax) else f"{self.amax:.4g} > {limit:g}"
        at = f"step {self.step}, " if self.step is not None else ""
        return f"first overflow: {at}module {self.module or '(the model)'}, phase {self.phase} ({what})"


def _floats(x: Any) -> list[torch.Tensor]:
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _floats(v)]
    return [x] if isinstance(x, torch.Tensor) and x.is_floating_point() else []


class OverflowLocator:
    """Hooks on every module of ``model``; ``limit``: the dtype's largest value; ``scale``: the loss scale in
    effect (for the headroom of unscaled values it is 1: gradients are checked as the backward sees them)."""

    def __init__(self, model: torch.nn.Module, limit: float = 65504.0, scale: float | None = None):
        self.model, self.limit, self.scale = model, float(limit), scale
        self.step: int | None = None
        self._handles: list[Any] = []
        self._first: Finding | None = None
        self._amax: dict[tuple[str, str], float] = {}
        self._pending: list[tuple[str, str, torch.Tensor]] = []  # values still on the device, in the order seen

    def __enter__(self) -> OverflowLocator:
        # closures, not bound methods, as hooks: a model deep-copied while it is watched must not copy the locator
        owned: set[int] = set()
        for name, module in self.model.named_modules():
            name = re.sub(r"^((module|_orig_mod)(\.|$))+", "", name)  # the user model's name: no DDP/compile prefix
            before, after = self._module_hooks(name)
            self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in owned:
                    owned.add(id(p))
                    self._handles.append(p.register_hook(self._seen(name, "parameter gradient")))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._settle()

    def _seen(self, name: str, phase: str) -> Callable[[torch.Tensor], None]:
        def hook(value: torch.Tensor) -> None:
            if value is not None and value.is_floating_point():
                self._pending.append((name, phase, value.detach().abs().amax().float()))

        return hook

    def _module_hooks(self, name: str) -> tuple[Any, Any]:
        seen = self._seen(name, "forward")

        def before(module: Any, args: Any) -> None:
            # the gradient of this module's inputs is what its own backward produced; a tensor several modules take
            # in (a parent and its first child) is claimed by the innermost, whose pre-hook runs last
            for t in [t for t in _floats(args) if t.requires_grad]:
                if getattr(t, "_amp_locate_owner", None) is None:
                    t.register_hook(lambda grad, t=t: self._seen(t._amp_locate_owner, "backward")(grad))
                t._amp_locate_owner = name

        def after(module: Any, args: Any, output: Any) -> None:
            for t in _floats(output):
                seen(t)

        return before, after

    def _settle(self) -> None:
        """Read the values queued since the last call (one device read) and keep the first finding."""
        if not self._pending:
            return
        values = torch.stack([v for _, _, v in self._pending]).tolist()
        for (name, phase, _), amax in zip(self._pending, values, strict=True):
            key = (name, phase)
            self._amax[key] = max(self._amax.get(key, 0.0), amax) if math.isfinite(amax) else math.inf
            if self._first is None and not (math.isfinite(amax) and amax <= self.limit):
                self._first = Finding(name, phase, amax, self.step)
        self._pending = []

    def next_step(self, step: int | None = None) -> Finding | None:
        """End one step (read its values) and start counting the next; returns the finding so far."""
        self._settle()
        self.step = step
        return self._first

    def finding(self) -> Finding | None:
        self._settle()
        return self._first

    def headroom(self) -> list[tuple[str, dict[str, float]]]:
        """Per module, lowest first, the bits of headroom per phase: ``log2(limit / amax)``, -inf where non-finite."""
        self._settle()
        rows: dict[str, dict[str, float]] = {}
        for (name, phase), amax in self._amax.items():
            rows.setdefault(name, {})[phase] = (math.log2(self.limit / amax) if 0 < amax < math.inf
                                                else (-math.inf if amax == math.inf else math.inf))
        return sorted(rows.items(), key=lambda kv: min(kv[1].values()))

    def report(self, top: int = 12, fix: Callable[[str], str] | None = None) -> str:
        """The finding (or that there was none), the headroom table, and how to keep that module in float32
        (``fix(module)``: the line in the caller's words, e.g. a config key; default: the core's call)."""
        first = self.finding()
        scale = f" at loss scale {self.scale:g}" if self.scale else ""
        head = first.line(self.limit) if first else f"no overflow: every value stayed within {self.limit:g}"
        lines = [head + scale, f"headroom in bits, log2({self.limit:g} / amax), lowest first:",
                 f"  {'module':<36} {'forward':>9} {'backward':>9} {'param grad':>10}"]
        special = {None: "-", -math.inf: "inf/nan", math.inf: "+inf"}  # no value, non-finite, all zero
        for name, bits in self.headroom()[:top]:
            cells = [special[b] if b in special else f"{b:.1f}" for b in (bits.get(p) for p in PHASES)]
            lines.append(f"  {(name or '(the model)')[:36]:<36} {cells[0]:>9} {cells[1]:>9} {cells[2]:>10}")
        grads = [min(bits.get(p, math.inf) for p in PHASES[1:]) for _, bits in self.headroom()
                 if any(p in bits for p in PHASES[1:])]
        if first is not None and first.phase != "forward" and len(grads) > 1 and max(grads) < 0:  # none to blame
            lines.append(f"every module's gradient passed {self.limit:g}: not one module but the loss scale "
                         f"({self.scale:g}) is too high; lower the scaler's init_scale (each skipped step halves it)")
        elif first is not None and first.module:
            how = fix(first.module) if fix else f'precision.keep_in_fp32(model, ["{first.module}"]) before prepare'
            lines.append(f"to keep it in float32: {how}")
        return "\n".join(lines)
