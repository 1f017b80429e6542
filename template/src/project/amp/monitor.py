"""Loss-scale and overflow statistics, and a guard against a collapsing loss scale.

The monitor never reads a device value on its own per step. Each optimizer step it copies the loss,
the grad norm and the scaler's (scale, growth tracker) into one small device tensor; :meth:`AmpMonitor.flush`
reads them all at once at a log tick (one sync per interval) and updates the statistics.

A step was skipped when the scaler backed off: after ``GradScaler.update()`` the growth tracker is 0 and
the scale did not grow. This comes from the scaler itself, so it stays right where Accelerate's
``optimizer_step_was_skipped`` is not (fused optimizers, gradient accumulation).

    monitor = AmpMonitor(accelerator.scaler)
    ...                                                 # after each optimizer step:
    monitor.record(step, loss, grad_norm, {"acc": acc})   # your own values are optional
    ...                                                 # in each checkpoint: monitor.state_dict()
    if step % log_every == 0:
        metrics = monitor.flush()                       # {"train/loss": ..., "amp/scale": ...}
        problem = monitor.check(min_scale, max_consecutive_skips)   # a guard.Problem or None
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from .guard import Problem

_ON_DEVICE = object()  # placeholder in AmpMonitor._pending for a value still on the device


def value_key(name: str) -> str:
    """The metric name of one of the loop's own values: ``train/NAME``, or the name itself when it has a split."""
    return name if "/" in name else f"train/{name}"


def scaler_state(scaler: Any) -> tuple[float, int] | None:
    """(scale, growth tracker) of a GradScaler as Python numbers, or None before its first use. Syncs."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    if getattr(scaler, "_scale", None) is None:
        return float(scaler._init_scale), int(getattr(scaler, "_init_growth_tracker", 0))
    return float(scaler._scale.item()), int(scaler._growth_tracker.item())


class AmpMonitor:
    """Per-run AMP statistics: steps, skipped steps, consecutive skips, loss scale min/max/mean/history,
    overflow events, non-finite losses. ``state_dict``/``load_state_dict`` make them survive a resume."""

    HISTORY = 256  # points kept in the downsampled scale history
    EVENTS = 500  # overflow events kept (the newest)

    def __init__(self, scaler: Any = None, scale_fn: Any = None):
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        # scale_fn: for engines that own their loss scale (DeepSpeed): () -> float, read at flush only
        self.scale_fn = scale_fn
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # optimizer steps recorded
        self.skipped = 0
        self.consecutive_skips = 0
        self.max_consecutive_skips = 0
        self.nonfinite_losses = 0
        self.consecutive_nonfinite = 0
        self.scale: float | None = None
        self.scale_min = math.inf
        self.scale_max = 0.0
        self.scale_sum = 0.0
        self.scale_count = 0
        self.history: list[tuple[int, float]] = []
        self._history_stride = 1
        self.events: list[dict[str, Any]] = []
        self.recent_skips: deque[int] = deque(maxlen=100)  # 1/0 per step, for the recent skip rate
        self.trend: deque[float] = deque(maxlen=48)  # scale at each flush, for the sparkline
        self.switches: list[dict[str, Any]] = []  # precision switches made by the collapse guard
        self.last_step = 0
        self.last_grad_norm: float | None = None
        self._prev_scale: float | None = None
        self._interval_loss = 0.0
        self._interval_count = 0
        self._interval_skips = 0
        self._interval_values: dict[str, list[float]] = {}  # the loop's own values: name -> [sum, count]
        self.value_names: list[str] = []  # the loop's own values seen, in order
        # (step, with scale, value names, (loss, grad_norm[, scale, growth tracker], *values) with _ON_DEVICE for
        # what is in packed, packed)
        self._pending: list[tuple[int, bool, tuple[str, ...], tuple[Any, ...], torch.Tensor | None]] = []

    # ------------------------------------------------------------------ per step (no sync)

    def record(
        self, step: int, loss: torch.Tensor | float | None, grad_norm: torch.Tensor | float | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        """Note one optimizer step. Call after ``optimizer.step()`` on steps where gradients synced.

        ``values``: the loop's own numbers for this step (tensors or floats), averaged over the log interval and
        reported by :meth:`flush` under their names (``train/NAME`` unless a name has its own ``split/``).
        """
        names = tuple(values) if values else ()
        fields: list[Any] = [loss, grad_norm]
        with_scale = self.scaler is not None and getattr(self.scaler, "_scale", None) is not None
        if with_scale:
            fields += [self.scaler._scale, self.scaler._growth_tracker]
        fields += [values[n] for n in names]
        tensors = [f for f in fields if isinstance(f, torch.Tensor)]
        packed = None
        if tensors:
            # One small copy on the accelerator, no sync. A copy, not a view: the scaler updates its scale in
            # place and a caller may reuse its loss tensor, and flush() must see this step's values.
            device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
            packed = torch.stack([t.detach().reshape(()).to(device, torch.float32, non_blocking=True) for t in tensors])
        plain = tuple(_ON_DEVICE if isinstance(f, torch.Tensor) else f for f in fields)
        self._pending.append((step, with_scale, names, plain, packed))

    # ------------------------------------------------------------------ at log ticks (one sync)

    def _drain(self) -> None:
        if not self._pending:
            return
        # one cat and one read per device (normally one): the only sync of the interval
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for *_, packed in self._pending:
            if packed is not None:
                by_device.setdefault(packed.device, []).append(packed)
        read = {dev: iter(torch.cat(ts).tolist()) for dev, ts in by_device.items()}
        for step, with_scale, names, plain, packed in self._pending:
            values = [next(read[packed.device]) if v is _ON_DEVICE else v for v in plain]
            loss, gn = (None if v is None else float(v) for v in values[:2])
            self._observe(step, loss, gn, values[2:4] if with_scale else None)
            for name, value in zip(names, values[4 if with_scale else 2:], strict=True):
                if value is not None:
                    if name not in self.value_names:
                        self.value_names.append(name)
                    total = self._interval_values.setdefault(name, [0.0, 0])
                    total[0] += float(value)
                    total[1] += 1
        self._pending.clear()
        if self.scale_fn is not None:
            self._observe_external_scale(float(self.scale_fn()))

    def _observe(self, step: int, loss: float | None, grad_norm: float | None, scale: list[float] | None) -> None:
        self.steps += 1
        self.last_step = step
        if grad_norm is not None:
            self.last_grad_norm = grad_norm
        skipped = False
        if scale is not None:
            now, tracker = scale
            prev = self._prev_scale if self._prev_scale is not None else self._initial_scale()
            skipped = tracker == 0 and not now > prev
            if skipped:
                self.events.append({"step": step, "scale_before": prev, "scale_after": now})
                del self.events[: -self.EVENTS]
            self._prev_scale = now
            self._note_scale(step, now)
        if loss is not None and not math.isfinite(loss):
            self.nonfinite_losses += 1
            self.consecutive_nonfinite += 1
        elif loss is not None:
            self.consecutive_nonfinite = 0
            self._interval_loss += loss
            self._interval_count += 1
        self.recent_skips.append(int(skipped))
        if skipped:
            self.skipped += 1
            self._interval_skips += 1
            self.consecutive_skips += 1
            self.max_consecutive_skips = max(self.max_consecutive_skips, self.consecutive_skips)
        else:
            self.consecutive_skips = 0

    def _initial_scale(self) -> float:
        return float(self.scaler._init_scale) if self.scaler is not None else math.nan

    def _observe_external_scale(self, scale: float) -> None:
        self._note_scale(self.last_step, scale)

    def _note_scale(self, step: int, scale: float) -> None:
        self.scale = scale
        self.scale_min = min(self.scale_min, scale)
        self.scale_max = max(self.scale_max, scale)
        self.scale_sum += scale
        self.scale_count += 1
        if step % self._history_stride == 0:
            self.history.append((step, scale))
            if len(self.history) > self.HISTORY:  # downsample: keep every other point, double the stride
                self.history = self.history[::2]
                self._history_stride *= 2

    def flush(self) -> dict[str, float]:
        """Read the pending device values (one sync) and return this interval's metrics, ``split/name``."""
        self._drain()
        out: dict[str, float] = {}
        if self._interval_count:
            out["train/loss"] = self._interval_loss / self._interval_count
        elif self.consecutive_nonfinite:
            out["train/loss"] = math.nan
        if self.last_grad_norm is not None:
            out["train/grad_norm"] = self.last_grad_norm
        if self.scale is not None:
            out["amp/scale"] = self.scale
            self.trend.append(self.scale)
        out["amp/skipped_steps"] = float(self.skipped)
        if self.scaler is not None or self.scale_fn is not None:
            out["amp/overflows"] = float(self._interval_skips)  # in this log interval: spikes on a curve
        out["amp/skip_rate"] = self.skipped / self.steps if self.steps else 0.0
        out["amp/consecutive_skips"] = float(self.consecutive_skips)
        if self.nonfinite_losses:
            out["amp/nonfinite_losses"] = float(self.nonfinite_losses)
        for name, (total, n) in self._interval_values.items():
            out[value_key(name)] = total / n
        self._interval_loss, self._interval_count, self._interval_skips = 0.0, 0, 0
        self._interval_values = {}
        return out

    @property
    def recent_skip_rate(self) -> float:
        return sum(self.recent_skips) / len(self.recent_skips) if self.recent_skips else 0.0

    # ------------------------------------------------------------------ collapse guard

    def check(self, min_scale: float, max_consecutive_skips: int) -> Problem | None:
        """What the collapse guard should know: a collapsed loss scale, or too many skips or non-finite losses in a row."""
        if self.scale is not None and self.scale < min_scale:  # a GradScaler's or scale_fn's (DeepSpeed)
            return Problem("scale_collapsed", f"loss scale collapsed to {self.scale:.3g} (below {min_scale:g})")
        if self.consecutive_skips >= max_consecutive_skips:
            return Problem("skips", f"{self.consecutive_skips} optimizer steps in a row were skipped for inf/NaN "
                                    f"gradients (limit {max_consecutive_skips})")
        if self.consecutive_nonfinite >= max_consecutive_skips:
            return Problem("nonfinite_loss", f"the loss was non-finite for {self.consecutive_nonfinite} steps in a row "
                                             f"(limit {max_consecutive_skips})")
        return None

    def diagnosis(self, problem: Problem, precision: str) -> str:
        """A multi-line explanation: what happened, the scale history, what to try."""
        hist = ", ".join(f"{s}:{v:.3g}" for s, v in self.history[-8:]) or "none (no scaler)"
        tips = [
            "lower the GradScaler's init_scale (e.g. 1024)",
            "use bf16 where the hardware supports it (no loss scaling needed)",
            "run the unstable modules in float32 (autocast off for them)",
            "lower the learning rate or clip gradients",
        ]
        if precision != "fp16":
            tips = ["lower the learning rate, check the data for bad values, clip gradients",
                    "run the unstable modules in float32 (autocast off for them)"]
        return "\n".join(
            [f"AMP guard: {problem.message}",
             f"  steps {self.steps}, skipped {self.skipped}, non-finite losses {self.nonfinite_losses}",
             f"  scale history (step:scale): {hist}",
             "  what to try:"] + [f"   - {t}" for t in tips]
        )

    # ------------------------------------------------------------------ summary and persistence

    def summary(self) -> dict[str, Any]:
        """The run's AMP statistics (also written to amp_summary.json)."""
        self._drain()
        has_scale = self.scale_count > 0
        return {
            "amp/steps": self.steps,
            "amp/skipped_steps": self.skipped,
            "amp/skip_rate": self.skipped / self.steps if self.steps else 0.0,
            "amp/max_consecutive_skips": self.max_consecutive_skips,
            "amp/nonfinite_losses": self.nonfinite_losses,
            "amp/scale": self.scale,
            "amp/scale_min": self.scale_min if has_scale else None,
            "amp/scale_max": self.scale_max if has_scale else None,
            "amp/scale_mean": self.scale_sum / self.scale_count if has_scale else None,
            "amp/overflow_events": len(self.events),
            "overflow_events": list(self.events[-20:]),
            "scale_history": [list(p) for p in self.history],
        }

    _STATE = (
        "steps", "skipped", "consecutive_skips", "max_consecutive_skips", "nonfinite_losses", "consecutive_nonfinite",
        "scale", "scale_min", "scale_max", "scale_sum", "scale_count", "_history_stride", "last_step",
        "last_grad_norm", "_prev_scale", "_interval_loss", "_interval_count", "_interval_skips", "_interval_values",
    )

    def state_dict(self) -> dict[str, Any]:
        self._drain()
        state = {k: getattr(self, k) for k in self._STATE}
        state.update(
            history=[list(p) for p in self.history],
            events=list(self.events),
            recent_skips=list(self.recent_skips),
            trend=list(self.trend),
            switches=list(self.switches),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for k in self._STATE:
            if k in state:
                setattr(self, k, state[k])
        self.history = [tuple(p) for p in state.get("history", [])]
        self.events = list(state.get("events", []))
        self.recent_skips.extend(state.get("recent_skips", []))
        self.trend.extend(state.get("trend", []))
        self.switches = list(state.get("switches", []))

    def sync_scale(self) -> None:
        """Take the scaler's current scale as the reference for the next step's skip test.

        Call after a resume: the scale in effect may be the checkpoint's, or a fresh scaler's after a
        cross-precision resume, rather than the one this monitor's saved statistics last saw. Reads once.
        """
        self._prev_scale = (scaler_state(self.scaler) or (None,))[0]
        if self.scaler is None and self.scale_fn is None:
            # resumed from an fp16 checkpoint into a run without loss scaling: its scale is history, not "now"
            self.scale = None
