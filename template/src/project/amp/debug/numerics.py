"""Which leaf modules lose the most to low precision: output and gradient error against a float32 shadow, in rounding
units (:data:`UNIT`), in ``eval()`` mode; :func:`suggest` keeps the worst in float32 (docs/debugger.md)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..precision import keep_in_fp32

UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # the dtype's rounding error u
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModuleError:
    name: str
    activation: float  # relative RMS error of the output, in rounding units
    gradient: float  # the same for the gradient of the loss with respect to the output

    @property
    def worst(self) -> float:
        return max(self.activation, self.gradient)


@dataclass
class Round:
    """One measurement: the fp32 modules in effect, the per-module errors (worst first), the flagged ones."""

    fp32_modules: list[str]
    errors: list[ModuleError]
    flagged: list[str] = field(default_factory=list)


def _capture(model: torch.nn.Module, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor], device_type: str,
             dtype: torch.dtype | None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """One forward and backward; per leaf module its output and the gradient of the loss with respect to it."""
    outs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def record(name: str, module: Any, args: Any, output: Any) -> None:
        t = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            outs[name] = t.detach().float()
            if t.requires_grad:
                t.register_hook(lambda g: grads.__setitem__(name, g.detach().float()))

    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:  # the leaf modules
            handles.append(module.register_forward_hook(partial(record, name)))
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(model, batch)
        loss.float().backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (o, grads.get(n)) for n, o in outs.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    ref, diff = a.norm(), (b - a).norm()
    if not torch.isfinite(diff):
        return math.inf
    return float(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)


def measure(build: Callable[[], torch.nn.Module], batches: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
            precision: str, device: torch.device | str = "cpu", fp32_modules: Iterable[str] = ()) -> list[ModuleError]:
    """Per leaf module, the error of ``precision`` (bf16 or fp16 autocast) against float32, worst first.
    ``build()`` returns the model in the state to compare from (a new one each call)."""
    device = torch.device(device)
    unit, dtype = UNIT[precision], DTYPE[precision]
    ref_model, low_model = build().to(device).eval(), build().to(device).eval()
    keep_in_fp32(low_model, list(fp32_modules))
    sums: dict[str, list[float]] = {}
    for batch in batches:
        a = _capture(ref_model, batch, loss_fn, device.type, None)
        b = _capture(low_model, batch, loss_fn, device.type, dtype)
        for name, (out_a, grad_a) in a.items():
            if name in b:
                out_b, grad_b = b[name]
                s = sums.setdefault(name, [0.0, 0.0])
                s[0] += _rel(out_a, out_b) / unit
                s[1] += _rel(grad_a, grad_b) / unit if grad_a is not None and grad_b is not None else 0.0
    n = max(len(batches), 1)
    return sorted((ModuleError(name, s[0] / n, s[1] / n) for name, s in sums.items()), key=lambda e: -e.worst)


def suggest(build: Callable[[], torch.nn.Module], batches: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
            precision: str, device: torch.device | str = "cpu", tolerance: float = 16.0, rounds: int = 3) -> list[Round]:
    """Measure; while a module is above ``tolerance``, keep the worst one in float32 and measure again."""
    kept: list[str] = []
    out: list[Round] = []
    for _ in range(rounds + 1):
        errors = measure(build, batches, loss_fn, precision, device, kept)
        flagged = [e.name for e in errors if e.worst > tolerance and e.name not in kept]
        out.append(Round(list(kept), errors, flagged))
        if not flagged or len(out) > rounds:
            break
        kept.append(flagged[0])
    return out


def loss_gap(build: Callable[[], torch.nn.Module], make_optimizer: Callable[[torch.nn.Module], Any],
             batches: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor], precision: str,
             device: torch.device | str = "cpu", fp32_modules: Iterable[str] = ()) -> float:
    """Train one step per batch from the same state in float32 and in ``precision`` (fp16 with a GradScaler); the
    relative difference of the mean loss over the last half of the steps."""
    device = torch.device(device)

    def run(dtype: torch.dtype | None, kept: list[str]) -> list[float]:
        model = build().to(device).eval()
        keep_in_fp32(model, kept)
        opt = make_optimizer(model)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # disabled: a plain step
        losses = []
        for batch in batches:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(model, batch).float()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    ref, low = run(None, []), run(DTYPE[precision], list(fp32_modules))
    half = max(1, len(ref) // 2)
    a, b = sum(ref[-half:]) / half, sum(low[-half:]) / half
    return abs(b - a) / abs(a) if a else math.inf


def table(errors: list[ModuleError], tolerance: float, top: int = 10) -> list[str]:
    """Plain lines: the worst modules, flagged above the tolerance."""
    lines = [f"  {'module':<36} {'activation':>10} {'gradient':>10}  (error in rounding units; over {tolerance:g}: *)"]
    for e in errors[:top]:
        flag = " *" if e.worst > tolerance else ""
        lines.append(f"  {e.name[:36]:<36} {e.activation:>10.1f} {e.gradient:>10.1f}{flag}")
    return lines


def copy_of(model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A ``build`` for :func:`measure` from a model in memory: a deep copy each call."""
    return lambda: copy.deepcopy(model)
