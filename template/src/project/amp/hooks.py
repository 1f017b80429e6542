"""The one place that wraps anything of yours; the session's features watch the loop through it.

:class:`Hooks` wraps, once each and only on the objects the session was given (never a class, nothing
process-wide): ``accelerator.backward`` and ``accelerator.unscale_gradients``; each prepared optimizer's ``step``
(gradients as the backward left them: scaled under fp16); its own optimizer's ``step`` and ``zero_grad`` and a
model's ``forward``, only where a feature needs them (bf16-true); and ``accelerator.scaler`` (fp16 on a CPU, and
hidden while a checkpoint is written). Each wrapper calls every :class:`Feature` that implements the hook, in the
order of :data:`FEATURES`:

============================  ============================================================================
``before_prepare(models, opts)``   before ``accelerator.prepare`` (bf16-true casts the model here)
``after_prepare(models, opts)``    the prepared objects
``before_forward / after_forward`` the model's inputs and outputs (bf16-true)
``after_backward()``               ``accelerator.backward`` returned
``before_unscale()``               ``accelerator.unscale_gradients`` (``clip_grad_norm_`` calls it)
``before_step / after_outer_step`` a prepared optimizer's step, on steps where gradients sync
``before_inner_step / after_inner_step / after_zero_grad``   the optimizer's own (after unscaling)
``on_batch(batch) / at_step(loss)``  a batch from ``amp.batches``; an optimizer step counted by ``amp.after_step``
``shared() -> [float]; at_tick(rows) -> (metrics, lines)``   a log tick: values for its one collective, the result
``state_dict / load_state_dict / meta / on_save / on_load / summary``   checkpoints and the run's summary
============================  ============================================================================

A feature is one module and one line in :data:`FEATURES`; ``make(hooks)`` returns the feature, or None where it
does not apply to this run. The features in ``debug/`` are optional: a copy of the kernel without that folder
(``amptpl add --minimal``) runs without them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

# Registration order is calling order: bf16-true's masters are rounded into the model before the meters look.
FEATURES = ("loopcheck.LoopChecks", "loopcheck.SameData", "precision.FusedSkipFix", "master.MasterWeights",
            "debug.audit.Audit", "debug.meters.Meters")


class Feature:
    """Base of the session's features: every hook is optional and does nothing here."""

    name = "feature"

    def __init__(self, hooks: Hooks):
        self.hooks = hooks

    @classmethod
    def make(cls, hooks: Hooks) -> Feature | None:
        """The feature for this run, or None where it does not apply."""
        return cls(hooks)

    def before_prepare(self, models: list[Any], optimizers: list[Any]) -> None: ...
    def after_prepare(self, models: list[Any], optimizers: list[Any]) -> None: ...
    def after_backward(self) -> None: ...
    def before_unscale(self) -> None: ...
    def before_step(self, optimizer: Any) -> None: ...
    def after_outer_step(self, optimizer: Any) -> None: ...
    def on_batch(self, batch: Any) -> None: ...
    def at_step(self, loss: Any) -> None: ...
    def shared(self) -> list[float]: return []
    def at_tick(self, rows: list[list[float]]) -> tuple[dict[str, float], list[str]]: return {}, []
    def state_dict(self) -> dict[str, Any]: return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def meta(self) -> dict[str, Any]: return {}
    def summary(self) -> dict[str, Any]: return {}
    def on_save(self, weights: list[dict[str, Any]]) -> None: ...
    def on_load(self, path: Any, models: list[Any]) -> None: ...
    # wrapped only where a feature defines them: the optimizer's own step and zero_grad, the model's forward
    before_inner_step = after_inner_step = after_zero_grad = before_forward = after_forward = None


def _load(spec: str) -> type | None:
    module, _, cls = spec.rpartition(".")
    try:
        return getattr(importlib.import_module(f".{module}", __package__), cls)
    except ModuleNotFoundError as e:
        if module.startswith("debug.") and e.name and e.name.startswith(f"{__package__}.debug"):
            return None  # the kernel without its debugger
        raise


class Hooks:
    """The wrappers and the features of one session. ``tick_due()`` says whether the optimizer step being computed
    ends at a log tick (the session sets it); ``say(line)`` prints one line of the session."""

    def __init__(self, accelerator: Any, settings: Any, resolution: Any, say: Callable[..., None], scaler: Any = None):
        self.accelerator, self.settings, self.resolution, self.say = accelerator, settings, resolution, say
        self.tick_due: Callable[[], bool] = lambda: False
        if scaler is not None:  # before prepare, or the prepared optimizer never unscales with it
            accelerator.scaler, accelerator.native_amp = scaler, True  # native_amp: prepare() wraps forward in autocast
        self.features: list[Feature] = []
        for spec in FEATURES:
            cls = _load(spec)
            feature = cls.make(self) if cls is not None else None
            if feature is not None:
                self.features.append(feature)
        self._wrap_accelerator()

    def get(self, name: str) -> Any:
        """The feature called ``name`` in this session, or None."""
        return next((f for f in self.features if f.name == name), None)

    def call(self, hook: str, *args: Any) -> list[Any]:
        """Call ``hook`` on every feature that has it, in order; their results."""
        return [getattr(f, hook)(*args) for f in self.features if getattr(f, hook, None) is not None]

    def shared(self) -> list[list[Any]]:
        """Each feature's values for the log tick's one collective (floats or 0-dim tensors)."""
        return [f.shared() for f in self.features]

    def at_tick(self, shared: list[list[Any]], rows: list[list[float]], first: int) -> dict[str, float]:
        """The tick's metrics from the features, given every process's row of the collective (the features' values
        from column ``first`` on, in the order of :meth:`shared`); their warnings are printed."""
        metrics: dict[str, float] = {}
        for f, values in zip(self.features, shared, strict=True):
            m, lines = f.at_tick([r[first:first + len(values)] for r in rows])
            first += len(values)
            metrics.update(m)
            for line in lines:
                self.say(line, style="yellow")
        return metrics

    def _defined(self, hook: str) -> bool:
        return any(getattr(f, hook, None) is not None for f in self.features)

    # ------------------------------------------------------------------ the wrappers

    def _wrap_accelerator(self) -> None:
        acc = self.accelerator
        backward, unscale = acc.backward, acc.unscale_gradients

        def amp_backward(loss: Any, **kwargs: Any) -> Any:
            out = backward(loss, **kwargs)
            self.call("after_backward")
            return out

        def amp_unscale(*args: Any, **kwargs: Any) -> Any:
            if acc.sync_gradients:
                self.call("before_unscale")
            return unscale(*args, **kwargs)

        acc.backward, acc.unscale_gradients = amp_backward, amp_unscale

    def before_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        """Before ``accelerator.prepare``: the features' casts, then the optimizer's own step and zero_grad and the
        model's forward wrapped where a feature needs them (Accelerate keeps the step it finds at prepare)."""
        self.call("before_prepare", models, optimizers)
        if self._defined("before_inner_step") or self._defined("after_inner_step"):
            for opt in optimizers:
                self._wrap_inner(opt)
        if self._defined("before_forward") or self._defined("after_forward"):
            for model in models:
                self._wrap_forward(model)

    def _wrap_inner(self, opt: Any) -> None:
        if getattr(opt, "_amp_inner", False):
            return
        step, zero_grad = opt.step, opt.zero_grad

        @functools.wraps(step)
        def inner_step(*args: Any, **kwargs: Any) -> Any:
            self.call("before_inner_step", opt)
            out = step(*args, **kwargs)
            self.call("after_inner_step", opt)
            return out

        @functools.wraps(zero_grad)
        def inner_zero_grad(set_to_none: bool = True) -> None:
            zero_grad(set_to_none)
            self.call("after_zero_grad", opt, set_to_none)

        opt.step, opt.zero_grad, opt._amp_inner = inner_step, inner_zero_grad, True

    def _wrap_forward(self, model: Any) -> None:
        forward = model.forward

        @functools.wraps(forward)
        def amp_forward(*args: Any, **kwargs: Any) -> Any:
            for f in self.features:
                if f.before_forward is not None:
                    args, kwargs = f.before_forward(args, kwargs)
            out = forward(*args, **kwargs)
            for f in self.features:
                if f.after_forward is not None:
                    out = f.after_forward(out)
            return out

        model.forward = amp_forward

    def watch_optimizers(self) -> int:
        """Wrap the step of every optimizer the accelerator prepared and that is not wrapped yet (also those a
        loop prepared with ``accelerator.prepare`` directly); returns how many were new."""
        new = 0
        for opt in self.accelerator._optimizers:
            if getattr(opt, "_amp_watched", False):
                continue
            step = opt.step

            @functools.wraps(step)
            def outer_step(*args: Any, __opt: Any = opt, __step: Any = step, **kwargs: Any) -> Any:
                synced = __opt.gradient_state.sync_gradients
                if synced:
                    self.call("before_step", __opt)
                out = __step(*args, **kwargs)
                if synced:
                    self.call("after_outer_step", __opt)
                return out

            opt.step, opt._amp_watched = outer_step, True
            new += 1
        return new

    # ------------------------------------------------------------------ the scaler

    @contextlib.contextmanager
    def scaler_hidden(self, hide: bool = True) -> Iterator[None]:
        """The accelerator without its scaler for a moment (a checkpoint handles scaler.pt itself)."""
        acc = self.accelerator
        scaler = acc.scaler
        if hide:
            acc.scaler = None
        try:
            yield
        finally:
            acc.scaler = scaler


def plain_module(module: Any) -> Any:
    """A copy of ``module`` and its children that shares their parameters and buffers, without the forward methods
    set on instances (Accelerate's autocast wrapper, bf16-true's, fp32 regions): it pickles as the model class."""
    import copy

    clone = copy.copy(module)
    for key in ("forward", "_original_forward", "_amp_fp32"):
        clone.__dict__.pop(key, None)
    clone._modules = {name: None if child is None else plain_module(child) for name, child in module._modules.items()}
    return clone
