"""Loss-scale statistics read at log ticks only, the collapse guard's pure policy (:func:`decide`), throughput."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

HISTORY = 256  # points kept in the downsampled scale history
EVENTS = 500  # overflow events kept (the newest)


def value_key(name: str) -> str:
    """The metric name of one of the loop's own values: ``train/NAME``, or the name itself when it has a split."""
    return name if "/" in name else f"train/{name}"


class AmpMonitor:
    """Per-run AMP statistics, kept over a resume; ``scale_fn``: a loss scale an engine owns (DeepSpeed)."""

    _STATE = ("steps", "skipped", "consecutive_skips", "max_consecutive_skips", "nonfinite_losses",
              "consecutive_nonfinite", "scale", "scale_min", "scale_max", "scale_sum", "scale_count", "history",
              "stride", "events", "switches", "last_step", "last_grad_norm", "prev_scale", "interval")

    def __init__(self, scaler: Any = None, scale_fn: Any = None):
        self.scaler, self.scale_fn = (scaler if scaler is not None and scaler.is_enabled() else None), scale_fn
        self.steps = self.skipped = self.consecutive_skips = self.max_consecutive_skips = 0
        self.nonfinite_losses = self.consecutive_nonfinite = self.scale_count = self.last_step = 0
        self.scale = self.last_grad_norm = self.prev_scale = None  # floats once a step has them
        self.scale_min, self.scale_max, self.scale_sum = math.inf, 0.0, 0.0
        self.history, self.stride = [], 1  # [step, scale] at every `stride`-th step (downsampled)
        self.events, self.switches = [], []  # overflow events; precision switches made by the collapse guard
        self.interval: dict[str, list[float]] = {}  # this log interval: name -> [sum, count] ("skips": [n, 0])
        self.recent_skips: deque[int] = deque(maxlen=100)  # 1/0 per step, for the recent skip rate
        self.trend: deque[float] = deque(maxlen=48)  # scale at each flush, for the sparkline
        self.value_names: list[str] = []  # the loop's own values seen, in order
        self._micro: dict[str, Any] = {}  # this optimizer step's micro-batch sums (" n": how many)
        self._micro_norm: Any = None
        self._pending: list[tuple[int, tuple[str, ...], list[Any], torch.Tensor | None]] = []

    def add(self, loss: Any, grad_norm: Any = None, values: dict[str, Any] | None = None) -> None:
        """One micro-batch: its loss and values are averaged over the step's micro-batches. No device read."""
        for name, value in (("loss", loss), *(values or {}).items()):
            if value is not None:
                value = value.detach() if isinstance(value, torch.Tensor) else float(value)
                self._micro[name] = self._micro[name] + value if name in self._micro else value
        self._micro[" n"] = self._micro.get(" n", 0) + 1
        self._micro_norm = self._micro_norm if grad_norm is None else grad_norm

    def end_step(self, step: int) -> None:
        """The optimizer step ``step`` is done: :meth:`record` it from what :meth:`add` collected."""
        n = self._micro.pop(" n", 1)
        means = {k: v / n for k, v in self._micro.items()}
        self.record(step, means.pop("loss", None), self._micro_norm, means)
        self._micro, self._micro_norm = {}, None

    def record(self, step: int, loss: Any, grad_norm: Any = None, values: dict[str, Any] | None = None) -> None:
        """Note one optimizer step, gradients synced (no device read); ``values``: the loop's own."""
        names = tuple(values or ())
        with_scale = self.scaler is not None and getattr(self.scaler, "_scale", None) is not None
        scale = [self.scaler._scale, self.scaler._growth_tracker] if with_scale else [None, None]
        fields = [loss, grad_norm, *scale, *(values[n] for n in names)]
        tensors = [f for f in fields if isinstance(f, torch.Tensor)]
        packed = None
        if tensors:
            # one small copy on the accelerator, no sync; a copy, not a view: the scaler updates its scale in place and
            # a caller may reuse its loss tensor, and flush() must see this step's values
            device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
            packed = torch.stack([t.detach().reshape(()).to(device, torch.float32, non_blocking=True) for t in tensors])
        self._pending.append((step, names, [f if not isinstance(f, torch.Tensor) else ... for f in fields], packed))

    def _drain(self) -> None:
        tensors = [p for *_, p in self._pending if p is not None]
        # one cat and one read per device (normally one): the only sync of the interval
        read = {d: iter(torch.cat([t for t in tensors if t.device == d]).tolist()) for d in {t.device for t in tensors}}
        for step, names, plain, packed in self._pending:
            loss, gn, scale, tracker, *values = [next(read[packed.device]) if v is ... else v for v in plain]
            self._observe(step, loss, gn, None if scale is None else (scale, tracker))
            for name, value in zip(names, values, strict=True):
                if value is not None:
                    self.value_names += [name] if name not in self.value_names else []
                    self._add(name, float(value))
        self._pending.clear()
        if self.scale_fn is not None:
            self._note_scale(self.last_step, float(self.scale_fn()))

    def _add(self, name: str, value: float) -> None:
        total = self.interval.setdefault(name, [0.0, 0])
        total[0], total[1] = total[0] + value, total[1] + 1

    def _observe(self, step: int, loss: float | None, grad_norm: float | None, scale: tuple | None) -> None:
        self.steps, self.last_step = self.steps + 1, step
        self.last_grad_norm = self.last_grad_norm if grad_norm is None else float(grad_norm)
        skipped = False
        if scale is not None:
            now, tracker = scale
            prev = self.prev_scale if self.prev_scale is not None else float(self.scaler._init_scale)
            skipped = tracker == 0 and not now > prev
            if skipped:
                self.events = [*self.events, {"step": step, "scale_before": prev, "scale_after": now}][-EVENTS:]
                self._add(" skips", 1.0)
            self.prev_scale = now
            self._note_scale(step, now)
        if loss is not None and not math.isfinite(loss):
            self.nonfinite_losses += 1
            self.consecutive_nonfinite += 1
        elif loss is not None:
            self.consecutive_nonfinite = 0
            self._add("loss", float(loss))
        self.recent_skips.append(int(skipped))
        self.skipped += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self.max_consecutive_skips = max(self.max_consecutive_skips, self.consecutive_skips)

    def _note_scale(self, step: int, scale: float) -> None:
        self.scale = scale
        self.scale_min, self.scale_max = min(self.scale_min, scale), max(self.scale_max, scale)
        self.scale_sum, self.scale_count = self.scale_sum + scale, self.scale_count + 1
        if step % self.stride == 0:
            self.history.append([step, scale])
            if len(self.history) > HISTORY:  # downsample: keep every other point, double the stride
                self.history, self.stride = self.history[::2], self.stride * 2

    def flush(self) -> dict[str, float]:
        """Read the pending device values (one sync) and return this interval's metrics, ``split/name``."""
        self._drain()
        interval, self.interval = self.interval, {}
        out: dict[str, float] = {}
        if "loss" in interval:
            out["train/loss"] = interval["loss"][0] / interval["loss"][1]
        elif self.consecutive_nonfinite:
            out["train/loss"] = math.nan
        if self.last_grad_norm is not None:
            out["train/grad_norm"] = self.last_grad_norm
        if self.scale is not None:
            out["amp/scale"] = self.scale
            self.trend.append(self.scale)
        out["amp/skipped_steps"] = float(self.skipped)
        if self.scaler is not None or self.scale_fn is not None:  # skips in this log interval: spikes on a curve
            out["amp/overflows"] = interval.get(" skips", [0.0])[0]
        out["amp/skip_rate"] = self.skipped / self.steps if self.steps else 0.0
        out["amp/consecutive_skips"] = float(self.consecutive_skips)
        if self.nonfinite_losses:
            out["amp/nonfinite_losses"] = float(self.nonfinite_losses)
        out.update({value_key(k): s / n for k, (s, n) in interval.items() if k in self.value_names})
        return out

    recent_skip_rate = property(lambda self: sum(self.recent_skips) / max(len(self.recent_skips), 1))

    def check(self, min_scale: float, max_consecutive_skips: int) -> Problem | None:
        """What the collapse guard should know: a collapsed loss scale, too many skips or non-finite losses in a row."""
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
        tips = (["lower the GradScaler's init_scale (e.g. 1024)",
                 "use bf16 where the hardware supports it (no loss scaling needed)"] if precision == "fp16" else
                ["lower the learning rate, check the data for bad values, clip gradients"])
        tips += ["run the unstable modules in float32 (autocast off for them)"]
        tips += ["lower the learning rate or clip gradients"] if precision == "fp16" else []
        return "\n".join([f"AMP guard: {problem.message}",
                          f"  steps {self.steps}, skipped {self.skipped}, non-finite losses {self.nonfinite_losses}",
                          f"  scale history (step:scale): {hist}", "  what to try:", *(f"   - {t}" for t in tips)])

    def summary(self) -> dict[str, Any]:
        """The run's AMP statistics (also written to amp_summary.json)."""
        self._drain()
        n = self.scale_count
        return {"amp/steps": self.steps, "amp/skipped_steps": self.skipped,
                "amp/skip_rate": self.skipped / self.steps if self.steps else 0.0,
                "amp/max_consecutive_skips": self.max_consecutive_skips, "amp/nonfinite_losses": self.nonfinite_losses,
                "amp/scale": self.scale, "amp/scale_min": self.scale_min if n else None,
                "amp/scale_max": self.scale_max if n else None, "amp/scale_mean": self.scale_sum / n if n else None,
                "amp/overflow_events": len(self.events), "overflow_events": self.events[-20:],
                "scale_history": self.history}

    def state_dict(self) -> dict[str, Any]:
        self._drain()
        return {**{k: getattr(self, k) for k in self._STATE}, "recent_skips": list(self.recent_skips),
                "trend": list(self.trend), "value_names": list(self.value_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in (k for k in self._STATE if k in state):
            setattr(self, k, state[k])
        self.recent_skips.extend(state.get("recent_skips", []))
        self.trend.extend(state.get("trend", []))
        self.value_names = list(state.get("value_names", self.value_names))

    def tick(self, accelerator: Any, guard: Any) -> tuple[dict[str, float], Problem | None]:
        """A log tick: the interval's metrics (with the first scheduler's or optimizer's lr) and the guard's problem."""
        m = self.flush()
        sched, opt = next(iter(accelerator._schedulers), None), next(iter(accelerator._optimizers), None)
        if sched is not None or opt is not None:
            m["train/lr"] = float(sched.get_last_lr()[0] if sched is not None else opt.param_groups[0]["lr"])
        return m, self.check(guard.min_scale, guard.max_consecutive_skips)

    def meta(self, stop: Stop | None, precision: str) -> dict[str, Any]:
        """For meta.json: the switches so far, the stop saved for (``signal_stop``; ``guard_stop``: fallback ``to``)."""
        asked = {"step": stop.step, "from": precision, "to": stop.to, "reason": stop.message} if stop else None
        return {"precision_switches": self.switches, **({f"{stop.reason}_stop": asked} if stop else {})}

    def switched(self, meta: dict[str, Any], path: Any, precision: str) -> list[str]:
        """Record the fallback a guard checkpoint asked for (``meta["guard_stop"]``) once resumed in it."""
        asked = meta.get("guard_stop") if isinstance(meta.get("guard_stop"), dict) else {}
        if asked.get("to") != precision:
            return []
        self.switches.append({**asked, "path": str(path)})
        return [f"precision switch: {asked['from']} -> {asked['to']} at step {asked['step']} ({asked['reason']})"]

    def sync_scale(self) -> None:
        """After a resume: the scale in effect now (restored or fresh) is the next step's skip reference. Reads once."""
        s = self.scaler
        self.prev_scale = None if s is None else float(s._scale.item() if s._scale is not None else s._init_scale)
        if self.scaler is None and self.scale_fn is None:
            self.scale = None  # resumed from an fp16 checkpoint into a run without loss scaling: history, not "now"


@dataclass(frozen=True)
class Problem:
    """What the monitor saw: a stable ``kind`` (for warn-once) and a message with the numbers."""

    kind: str  # "scale_collapsed" | "skips" | "nonfinite_loss" | "other_rank"
    message: str


@dataclass(frozen=True)
class Decision:
    action: str  # ok | warn | stop | fallback
    problem: Problem | None = None
    to: str | None = None  # the precision to fall back to


def fallback_target(precision: str, native_bf16: bool) -> str | None:
    """fp16 -> bf16 where the device runs it natively, else fp32; bf16 and bf16-true -> fp32; fp32 -> None."""
    return {"fp16": "bf16" if native_bf16 else "fp32", "bf16": "fp32", "bf16-true": "fp32"}.get(precision)


def decide(guard: Any, problem: Problem | None, *, precision: str, native_bf16: bool, warned: str | None) -> Decision:
    """The guard's decision at a log tick; a non-finite loss without loss scaling stops even under ``warn``."""
    if problem is None:
        return Decision("ok")
    if guard.action == "warn" and not (problem.kind == "nonfinite_loss" and precision != "fp16"):
        return Decision("ok" if problem.kind == warned else "warn", problem)
    to = fallback_target(precision, native_bf16) if guard.action == "fallback" else None
    return Decision("fallback", problem, to) if to is not None else Decision("stop", problem)


@dataclass(frozen=True)
class Stop:
    """Why and where a run stopped, its state saved: a signal (exit 0) or the guard (3, maybe asking for ``to``)."""

    reason: str  # "signal" | "guard"
    step: int
    path: str
    message: str  # the signal's name, or the guard's problem
    to: str | None = None

    exit_code = property(lambda self: 3 if self.reason == "guard" else 0)


@dataclass
class Clock:
    """Wall time per optimizer step and throughput over all processes since the last read."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)

    def read(self, step: int, samples: int, tokens: int) -> dict[str, float]:
        """``perf/*`` since the last read (samples and tokens only when counted: an offset counts nothing)."""
        now = time.perf_counter()
        out = {"perf/elapsed_s": now - self.start}
        if step > self.step:
            dt = max(now - self.last, 1e-9)
            out["perf/step_time_s"] = dt / (step - self.step)
            if samples > self.samples:
                out["perf/samples_per_s"] = (samples - self.samples) / dt
            if tokens > self.tokens:
                out["perf/tokens_per_s"] = (tokens - self.tokens) / dt
        self.last, self.step, self.samples, self.tokens = now, step, samples, tokens
        return out
