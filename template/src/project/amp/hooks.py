"""The one place that wraps anything of yours, once each (the accelerator's ``backward``, ``unscale_gradients``,
``init_trackers`` and ``scaler``, prepared optimizers' ``step``, and where a feature needs them the optimizer's own
``step``/``zero_grad`` and the model's ``forward``), calling the features defining a hook in :data:`FEATURES` order."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

# Registration order is calling order: bf16-true's masters are rounded into the model before the meters look.
FEATURES = ("debug.loopcheck.LoopChecks", "debug.loopcheck.SameData", "debug.loopcheck.RandomAhead",
            "precision.FusedSkipFix", "master.MasterWeights", "debug.audit.Audit", "debug.meters.Meters")


class Feature:
    """Base of the session's features: the hooks it needs (none required); :meth:`make` says if it applies."""

    name = "feature"
    # wrapped only where a feature defines them: the optimizer's own step and zero_grad, the model's forward
    before_inner_step = after_inner_step = after_zero_grad = before_forward = after_forward = None

    def __init__(self, hooks: Hooks):
        self.hooks = hooks

    @classmethod
    def make(cls, hooks: Hooks) -> Feature | None:
        return cls(hooks)

    def state_dict(self) -> dict[str, Any]: return {}  # noqa: E704 - what a checkpoint keeps of the feature
    def load_state_dict(self, state: dict[str, Any]) -> None: ...  # noqa: E704


def _load(spec: str) -> type | None:
    module, _, cls = spec.rpartition(".")
    try:
        return getattr(importlib.import_module(f".{module}", __package__), cls)
    except ModuleNotFoundError as e:
        if module.startswith("debug.") and (e.name or "").startswith(f"{__package__}.debug"):
            return None  # the kernel without its debugger
        raise


class Hooks:
    """The wrappers and the features of one session; ``say(line, style=None)`` prints a line of the session."""

    def __init__(self, accelerator: Any, settings: Any, resolution: Any, say: Callable[..., None], scaler: Any = None):
        self.accelerator, self.settings, self.resolution, self.say = accelerator, settings, resolution, say
        self.tick_due: Callable[[], bool] = lambda: False
        self.tracked: Any = None  # what the loop keeps with amp.track (position.Tracked; the session sets both)
        if scaler is not None:  # before prepare, or the prepared optimizer never unscales with it; native_amp makes
            accelerator.scaler, accelerator.native_amp = scaler, True  # prepare() wrap the forward in autocast
        self.features = [f for spec in FEATURES if (cls := _load(spec)) and (f := cls.make(self)) is not None]
        backward, unscale = accelerator.backward, accelerator.unscale_gradients
        start_trackers = accelerator.init_trackers

        def amp_backward(loss: Any, **kwargs: Any) -> Any:
            out = backward(loss, **kwargs)
            self.call("after_backward")
            return out

        def amp_unscale(*args: Any, **kwargs: Any) -> Any:
            if accelerator.sync_gradients:
                self.call("before_unscale")
            return unscale(*args, **kwargs)

        def init_trackers(*args: Any, **kwargs: Any) -> None:
            if accelerator.trackers:  # a second call would log every record twice
                self.say("accelerator.init_trackers: the trackers run already; this call is ignored (AmpSession's "
                         "run_name=, tracker_kwargs= and config= set them up)", style="yellow")
                return
            start_trackers(*args, **kwargs)

        accelerator.backward, accelerator.unscale_gradients = amp_backward, amp_unscale
        accelerator.init_trackers = init_trackers

    def get(self, name: str) -> Any:
        return next((f for f in self.features if f.name == name), None)

    def call(self, hook: str, *args: Any) -> list[Any]:
        return [getattr(f, hook)(*args) for f in self.features if getattr(f, hook, None) is not None]

    def shared(self) -> list[list[Any]]:
        """Each feature's values for the log tick's one collective (floats or 0-dim tensors)."""
        return [f.shared() if hasattr(f, "shared") else [] for f in self.features]

    def at_tick(self, shared: list[list[Any]], rows: list[list[float]], first: int) -> dict[str, float]:
        """The features' metrics from each process's row of the collective (from column ``first``); warnings printed."""
        metrics: dict[str, float] = {}
        for f, values in zip(self.features, shared, strict=True):
            m, lines = f.at_tick([r[first:first + len(values)] for r in rows]) if hasattr(f, "at_tick") else ({}, [])
            first += len(values)
            metrics.update(m)
            for line in lines:
                self.say(line, style="yellow")
        return metrics

    def before_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        """The features' casts, then the inner-step and forward wrappers (prepare keeps the step it finds)."""
        self.call("before_prepare", models, optimizers)
        defined = {h for f in self.features for h in ("before_inner_step", "before_forward", "after_forward")
                   if getattr(f, h, None)}
        for opt in (o for o in optimizers if "before_inner_step" in defined and not getattr(o, "_amp_inner", False)):
            @functools.wraps(opt.step)
            def inner_step(*args: Any, __opt: Any = opt, __step: Any = opt.step, **kwargs: Any) -> Any:
                self.call("before_inner_step", __opt)
                out = __step(*args, **kwargs)
                self.call("after_inner_step", __opt)
                return out

            @functools.wraps(opt.zero_grad)
            def inner_zero_grad(set_to_none: bool = True, __opt: Any = opt, __zero: Any = opt.zero_grad) -> None:
                __zero(set_to_none)
                self.call("after_zero_grad", __opt, set_to_none)

            opt.step, opt.zero_grad, opt._amp_inner = inner_step, inner_zero_grad, True
        for model in models if {"before_forward", "after_forward"} & defined else ():
            @functools.wraps(model.forward)
            def amp_forward(*args: Any, __forward: Any = model.forward, **kwargs: Any) -> Any:
                for f in self.features:
                    args, kwargs = f.before_forward(args, kwargs) if f.before_forward else (args, kwargs)
                out = __forward(*args, **kwargs)
                for f in self.features:
                    out = f.after_forward(out) if f.after_forward else out
                return out

            model.forward = amp_forward

    def watch_optimizers(self) -> None:
        """Wrap the step of every optimizer the accelerator prepared (by the loop's own prepare too), once."""
        for opt in (o for o in self.accelerator._optimizers if not getattr(o, "_amp_watched", False)):
            @functools.wraps(opt.step)
            def outer_step(*args: Any, __opt: Any = opt, __step: Any = opt.step, **kwargs: Any) -> Any:
                synced = __opt.gradient_state.sync_gradients
                if synced:
                    self.call("before_step", __opt)
                out = __step(*args, **kwargs)
                if synced:
                    self.call("after_outer_step", __opt)
                return out

            opt.step, opt._amp_watched = outer_step, True

    @contextlib.contextmanager
    def scaler_hidden(self, hide: bool = True) -> Iterator[None]:
        """The accelerator without its scaler for a moment (a checkpoint handles scaler.pt itself)."""
        acc, scaler = self.accelerator, self.accelerator.scaler
        acc.scaler = None if hide else scaler
        try:
            yield
        finally:
            acc.scaler = scaler


def plain_module(module: Any) -> Any:
    """A copy of ``module`` sharing its tensors, without the forwards set on instances: it pickles as its class."""
    clone = copy.copy(module)
    for key in ("forward", "_original_forward", "_amp_fp32"):
        clone.__dict__.pop(key, None)
    clone._modules = {name: None if child is None else plain_module(child) for name, child in module._modules.items()}
    return clone
