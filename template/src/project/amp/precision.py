"""Pick the precision for this device, say why, and make Accelerate run it (fp16 on a CPU: a real CPU GradScaler)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, GradScalerKwargs

from .hooks import Feature
from .settings import PRECISIONS, SettingsError, env_flag, normalise_precision


class PrecisionError(ValueError):
    """A precision that cannot run (an unknown name, the launcher's fp8); one line."""


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`: what was asked, what runs, and why."""

    requested: str
    effective: str  # fp32 | bf16 | fp16 | bf16-true
    reason: str
    device_type: str

    @property
    def uses_scaler(self) -> bool:
        return self.effective == "fp16"

    @property
    def mixed_precision(self) -> str:
        """The value for ``Accelerator(mixed_precision=...)`` (bf16-true: no autocast, the weights are bf16)."""
        return {"fp32": "no", "bf16-true": "no"}.get(self.effective, self.effective)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.effective)

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype the model's weights are stored in when it is not float32 (bf16-true), else None."""
        return torch.bfloat16 if self.effective == "bf16-true" else None

    def line(self) -> str:
        """One line for the start banner, e.g. ``precision: requested auto -> bf16 (CPU supports AMX-BF16)``."""
        return f"precision: requested {self.requested} -> {self.effective} ({self.reason})"


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (``flags``, ``model name``), or None where there is none."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    return None


def cpu_bf16_feature() -> str | None:
    """Name of the CPU feature that makes bf16 autocast fast here (AMX-BF16 or AVX512-BF16), else None."""
    cpu = getattr(torch._C, "_cpu", None)
    amx, avx = getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        return ("AMX-BF16" if amx() else "AVX512-BF16") if avx() else None
    flags = set((_cpuinfo("flags") or "").split())
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _mps_macos14() -> bool:
    check = getattr(getattr(torch.backends, "mps", None), "is_macos_or_newer", None)
    return bool(check(14, 0)) if check is not None else False


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively (not emulated), fast or not: where a guard fallback can go."""
    kind = getattr(device, "type", None) or torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return cpu_bf16_feature() is not None
    if kind == "mps":
        return torch_version() >= (2, 6) and _mps_macos14()
    return bool(getattr(getattr(torch, kind, None), "is_bf16_supported", lambda: False)())


def has_accelerator() -> bool:
    """True when torch sees a device Accelerate would use instead of the CPU (CUDA, MPS, XPU, NPU, ...)."""
    mps = getattr(torch.backends, "mps", None)
    return (torch.cuda.is_available() or (mps is not None and mps.is_available())
            or any(getattr(getattr(torch, n, None), "is_available", lambda: False)()
                   for n in ("xpu", "npu", "mlu", "musa", "hpu", "sdaa")))


def resolve(requested: str | None, device: torch.device | str, launcher: str | None = None) -> Resolution:
    """Resolve ``auto|fp32|bf16|fp16|bf16-true`` for ``device`` and say why; ``auto`` follows a launcher's fp16/bf16."""
    req = normalise_precision(requested) or "auto"
    if req not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {'|'.join(PRECISIONS)} (or no), got {requested!r}")
    launch = normalise_precision(launcher)
    if launch == "fp8":
        raise PrecisionError("the launcher asked for mixed_precision fp8, which this AMP core does not run; "
                             "use fp16 or bf16 (accelerate launch --mixed_precision ...)")
    followed = req == "auto" and launch in ("bf16", "fp16")
    r = _resolve(launch if followed else req, torch.device(device))
    if followed:
        return dataclasses.replace(r, requested="auto", reason=f"the launcher asked for {launch}; {r.reason}")
    if req == "auto" and launch == "fp32":
        return dataclasses.replace(r, reason=f"{r.reason}; the launcher's mixed_precision no is taken as not asked "
                                   "(AmpSession(None) under `--mixed_precision no`, or precision fp32, runs fp32)")
    if req != "auto" and launch in ("bf16", "fp16") and launch != r.effective:
        return dataclasses.replace(r, reason=f"{r.reason}; the launcher asked for {launch}, the explicit precision wins")
    return r


def launcher_choice() -> str:
    """``fp32`` where the launcher's command line says ``--mixed_precision no`` (its default too), else ``auto``."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux: the launcher's no cannot be told from its default
        return "auto"
    flags = [a.replace("-", "_") for a in args]  # --mixed_precision no, --mixed_precision=no
    said = {*zip(flags, flags[1:], strict=False), *(tuple(a.split("=", 1)) for a in flags if "=" in a)}
    asked = ("__mixed_precision", "no") in said and os.environ.get("ACCELERATE_MIXED_PRECISION") == "no"
    return "fp32" if asked else "auto"


def _resolve(req: str, device: Any) -> Resolution:
    kind, asked = device.type, ("as requested: bf16 weights, activations and gradients, float32 master weights in "
                                "the optimizer") if req == "bf16-true" else "as requested"
    if kind == "mps":  # Accelerate's own limits: autocast bf16 needs torch >= 2.6 and macOS 14, fp16 torch >= 2.5
        tv = torch_version()
        bf16_ok, fp16_ok, v = tv >= (2, 6) and _mps_macos14(), tv >= (2, 5), f"torch {tv[0]}.{tv[1]}"
        if req == "auto" and bf16_ok:
            return Resolution(req, "bf16", f"MPS runs bf16 autocast ({v}, macOS 14+); no loss scaling needed", kind)
        if req == "auto" and fp16_ok:
            return Resolution(req, "fp16", f"MPS: bf16 needs torch >= 2.6 and macOS 14, this is {v}; fp16 with a "
                              "GradScaler", kind)
        if req == "auto":
            return Resolution(req, "fp32", f"MPS mixed precision needs torch >= 2.5, this is {v}", kind)
        if req in ("bf16", "bf16-true") and not bf16_ok:
            return Resolution(req, "fp32", f"{req} on MPS needs torch >= 2.6 and macOS 14 ({v}): running fp32", kind)
        if req == "fp16" and not fp16_ok:
            return Resolution(req, "fp32", f"fp16 on MPS needs torch >= 2.5 ({v}): running fp32", kind)
        return Resolution(req, req, asked, kind)
    if kind == "cpu":
        feature = cpu_bf16_feature()
        if req == "auto" and feature == "AMX-BF16":
            return Resolution(req, "bf16", f"CPU supports {feature}", kind)
        if req == "auto" and feature:  # slower than fp32 on tiny models: debug/autopick.py times it on the model
            return Resolution(req, "bf16", "CPU supports AVX512-BF16: native bf16, faster than fp32 from models the "
                              "size of the default example up", kind)
        if req == "auto":
            return Resolution(req, "fp32", "CPU has neither AMX-BF16 nor AVX512-BF16; bf16 would be emulated", kind)
        if req in ("bf16", "bf16-true") and not feature:
            return Resolution(req, req, f"{asked}; CPU lacks AMX/AVX512-BF16, bf16 is emulated and slow", kind)
        return Resolution(req, req, "as requested; CPU autocast with a CPU GradScaler" if req == "fp16" else asked, kind)
    cuda = kind == "cuda"  # and xpu, npu, mlu, ...: bf16 where the backend says it is native
    name = torch.cuda.get_device_name(device) if cuda else kind
    bf16_ok = native_bf16(device)
    if req == "auto" and bf16_ok:
        return Resolution(req, "bf16", f"{name} {'supports bf16 natively' if cuda else 'reports native bf16'}; no loss "
                          "scaling needed", kind)
    if req == "auto":
        return Resolution(req, "fp16", f"{name} has no native bf16; fp16 with a GradScaler", kind) if cuda else \
            Resolution(req, "fp32", f"{kind} does not report native bf16; choose bf16 or fp16 explicitly", kind)
    if cuda and req in ("bf16", "bf16-true") and not bf16_ok:
        return Resolution(req, req, f"{name} emulates bf16: expect it to be slow", kind)
    return Resolution(req, req, asked, kind)


def accelerator_for(settings: Any, probe: Any = None, **kwargs: Any) -> tuple[Any, Resolution, Any]:
    """``(Accelerator, Resolution, settings)`` for ``settings.precision`` here; a GradScalerKwargs gives its knobs."""
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    theirs = next((h for h in handlers if isinstance(h, GradScalerKwargs)), None)
    if theirs is not None:  # the loop's own GradScalerKwargs: its knobs are the settings'
        if settings.scaler != type(settings.scaler)():
            raise ValueError("pass the GradScaler settings once: AmpSettings(scaler=...) or a GradScalerKwargs")
        knobs = {k: getattr(theirs, k) for k in vars(settings.scaler)}
        settings = dataclasses.replace(settings, scaler=type(settings.scaler)(**knobs))
    # PartialState(cpu=...) first: else a CPU-only `accelerate launch --multi_gpu` makes N ranks 0 of 1 each
    cpu = bool(kwargs.pop("cpu", False)) or env_flag("ACCELERATE_USE_CPU") or not has_accelerator()
    state = PartialState(cpu=cpu)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    res = resolve(settings.precision, state.device, launcher=launcher)
    if settings.precision == "auto" and normalise_precision(launcher) not in ("bf16", "fp16") and probe is not False:
        with contextlib.suppress(ImportError):  # without the debugger (debug/): the hardware rule
            from .debug import autopick

            res = autopick.for_session(res, state, probe, settings.auto)
    ours = accelerator_kwargs(res, None if theirs is not None else settings.scaler_kwargs)
    # a seeded sampler: the data order depends only on (seed, epoch), so a resume is exact
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True))
    acc = Accelerator(cpu=cpu, mixed_precision=ours["mixed_precision"],
                      kwargs_handlers=ours["kwargs_handlers"] + handlers, **kwargs)
    if acc.device.type == "cuda" and (settings.tf32 or settings.cudnn_benchmark):
        set_tf32(settings.tf32, settings.cudnn_benchmark)
    return acc, res, settings


def accelerator_kwargs(resolution: Resolution, scaler: dict[str, Any] | None = None) -> dict[str, Any]:
    """``mixed_precision`` and, for fp16, a GradScalerKwargs handler (none under DeepSpeed, which owns its scale)."""
    with_scaler = resolution.uses_scaler and scaler and not env_flag("ACCELERATE_USE_DEEPSPEED")
    return {"mixed_precision": resolution.mixed_precision,
            "kwargs_handlers": [GradScalerKwargs(**scaler)] if with_scaler else []}


def cpu_fp16_scaler(accelerator: Any, scaler: dict[str, Any] | None = None) -> Any:
    """A real ``GradScaler("cpu")`` for a CPU fp16 accelerator (Accelerate runs fp32 there), else None;
    installed before ``prepare``, which captures it (one set afterwards never unscales)."""
    if accelerator.device.type != "cpu" or accelerator.mixed_precision != "fp16":
        return None
    if accelerator._models or accelerator._optimizers:
        raise RuntimeError("the CPU fp16 GradScaler must be installed before accelerator.prepare(...)")
    if "DEEPSPEED" in str(getattr(accelerator, "distributed_type", "")):
        return None  # DeepSpeed owns its loss scale
    return torch.amp.GradScaler("cpu", **(scaler or {}))


def engine_loss_scale(accelerator: Any, model: Any) -> Callable[[], float] | None:
    """For engines that own the loss scale (DeepSpeed fp16): a callable that reads it at log ticks, else None."""
    opt = getattr(model, "optimizer", None)  # the DeepSpeed engine's (ZeRO or FP16) optimizer
    if "DEEPSPEED" not in str(getattr(accelerator, "distributed_type", "")) or accelerator.mixed_precision != "fp16" \
            or opt is None:
        return None
    return lambda: float(opt.loss_scale if getattr(opt, "loss_scale", None) is not None
                         else getattr(opt, "cur_scale", float("nan")))


def set_tf32(enabled: bool, cudnn_benchmark: bool = False) -> None:
    """TF32 for the fp32 matmuls and convolutions on Ampere+ GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.benchmark = cudnn_benchmark


class FusedSkipFix(Feature):
    """``step_was_skipped`` right for fused optimizers (accelerate issue 4242): read off the scale's back-off."""

    name = "fused_skip"

    @classmethod
    def make(cls, hooks: Any) -> FusedSkipFix | None:
        scaler = hooks.accelerator.scaler
        return cls(hooks) if scaler is not None and scaler.is_enabled() else None

    def before_step(self, optimizer: Any) -> None:
        scale = getattr(self.hooks.accelerator.scaler, "_scale", None)
        if getattr(getattr(optimizer, "optimizer", None), "_step_supports_amp_scaling", False) and scale is not None:
            self._before = scale.clone()

    def after_outer_step(self, optimizer: Any) -> None:
        before = self.__dict__.pop("_before", None)
        if before is not None:
            optimizer._is_overflow = bool((self.hooks.accelerator.scaler._scale < before).item())


@contextlib.contextmanager
def fp32_region(device_type: str | None = None) -> Iterator[None]:
    """Autocast off (``device_type``'s, or whichever is in effect) for the enclosed code."""
    def on(kind: str) -> bool:
        try:
            return bool(torch.is_autocast_enabled(kind))
        except (TypeError, RuntimeError, ValueError):  # an unknown device type on this torch build
            return False

    with contextlib.ExitStack() as stack:
        for kind in [device_type] if device_type else [d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "npu") if on(d)]:
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """``x`` with every floating-point tensor in it (lists, tuples, dicts, ModelOutputs) cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(cast_floats(v, dtype) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(cast_floats(v, dtype) for v in x)
    if isinstance(x, dict):
        out = copy.copy(x)  # keeps the class (a ModelOutput stays one)
        for k, v in x.items():
            out[k] = cast_floats(v, dtype)
        return out
    return x


def covers_all(model: torch.nn.Module, names: list[str]) -> bool:
    """Whether every parameter of ``model`` is in one of the modules ``names`` (all of it runs in float32)."""
    return all(any(p.startswith(f"{n}.") for n in names) for p, _ in model.named_parameters())


def keep_in_fp32(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Run the submodules matching ``patterns`` (fnmatch) with autocast off on float32 inputs; their names."""
    modules = {n: m for n, m in model.named_modules() if n}
    matched: list[str] = []
    for pat in patterns:
        hits = [n for n in modules if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise SettingsError(f"fp32_modules: fp32 module pattern {pat!r} matches no module (e.g. "
                                f"{', '.join(list(modules)[:4])})")
        matched += [h for h in hits if h not in matched]
    for mod in (modules[n] for n in matched if not getattr(modules[n], "_amp_fp32", False)):
        @functools.wraps(mod.forward)
        def fp32_forward(*args: Any, __forward: Any = mod.forward, __mod: Any = mod, **kwargs: Any) -> Any:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            device = first.device.type if first is not None else "cpu"
            with torch.autocast(device_type=device, enabled=False):
                out = __forward(*cast_floats(args, torch.float32), **cast_floats(kwargs, torch.float32))
            back = getattr(__mod, "_amp_cast_back", None)  # bf16-true: the next module takes bf16 (amp/master.py)
            return out if back is None else cast_floats(out, back)

        mod.forward, mod._amp_fp32 = fp32_forward, True
    return matched
