"""All the settings of an AMP session: one frozen, torch-free object; a project's ``amp`` config (comments: --help)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-true")
# other spellings users and launchers give the same precisions (Accelerate's "no" is fp32)
ALIASES = {"no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "bf16_true": "bf16-true"}
AUDIT_MODES = ("off", "warn", "strict")
GUARD_ACTIONS = ("warn", "stop", "fallback")
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the scale is a float32


class SettingsError(ValueError):
    """A setting out of range; one line starting with its dotted name."""


@dataclass(frozen=True)
class ScalerSettings:
    """GradScaler knobs, passed to Accelerate as GradScalerKwargs (fp16 only)."""

    init_scale: float = 65536.0  # 2**16, PyTorch's default; at most 3.4e38 (a float32)
    growth_factor: float = 2.0  # scale *= growth_factor after growth_interval clean steps
    backoff_factor: float = 0.5  # scale *= backoff_factor on an overflow (step skipped)
    growth_interval: int = 2000  # clean steps before the scale grows


@dataclass(frozen=True)
class GuardSettings:
    """What to do when the loss scale collapses (every step skipped, scale driven toward 0)."""

    min_scale: float = 2.0**-14  # a scale below this counts as collapsed (2**-14)
    max_consecutive_skips: int = 25  # this many skipped steps (or non-finite losses) in a row counts too
    action: str = "stop"  # warn | stop (save, end the run with status 3) | fallback (save, go on in a safer precision)
    locate: bool = False  # when it trips, replay to the first overflow and name the module (a project's locate)


@dataclass(frozen=True)
class AutoSettings:
    """How precision=auto decides where the hardware alone cannot (a CPU with AVX512-BF16 or AMX, a GPU)."""

    measure: bool = True  # time fp32 and bf16 (and fp16 on a GPU) on this model first; cached per machine and shape
    candidates: list[str] = field(default_factory=list)  # the precisions to time instead, e.g. [fp32, bf16, bf16-true]


@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision, the fp16 loss scaler and its guard, and the session's cadences, console and trackers."""

    precision: str = "auto"  # auto | fp32 | bf16 | fp16 | bf16-true (bf16 weights, fp32 masters); "no" is fp32
    auto: AutoSettings = field(default_factory=AutoSettings)
    scaler: ScalerSettings = field(default_factory=ScalerSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    fp32_modules: list[str] = field(default_factory=list)  # module name patterns run without autocast (fnmatch)
    audit: str = "warn"  # check the tensors' dtypes after the first step: off | warn | strict (an error)
    meters: bool = True  # at log ticks: amp/scale_headroom_bits, amp/grad_underflow_frac, amp/lost_update_frac
    tf32: bool = False  # TF32 matmuls for the fp32 parts on Ampere+ GPUs (false: torch's setting is left alone)
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest kernels (not bitwise reproducible)
    log_every: int = 10  # steps between log ticks: console line, metrics, guard (the only device reads)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # newest checkpoints kept
    live: bool = True  # rich live panel on a terminal; plain lines when false or not a terminal
    trackers: list[str] = field(default_factory=list)  # Accelerate trackers besides metrics.jsonl, e.g. [tensorboard]
    run_name: str = ""  # the trackers' project/run name; empty = the name of out_dir
    tracker_kwargs: dict = field(default_factory=dict)  # per tracker, e.g. {wandb: {entity: me, tags: [amp]}}

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, allowed: str, value: Any) -> None:
            if not ok:
                raise SettingsError(f"{key}: must be {allowed}, got {value!r}")

        for name, cls in (("scaler", ScalerSettings), ("guard", GuardSettings), ("auto", AutoSettings)):
            if isinstance(getattr(self, name), dict):  # AmpSession("fp16", out, scaler={"init_scale": 1024.0})
                object.__setattr__(self, name, cls(**getattr(self, name)))
        precision = normalise_precision(self.precision)
        need(precision in PRECISIONS, "precision", f"one of {'|'.join(PRECISIONS)} (or no)", self.precision)
        object.__setattr__(self, "precision", precision)  # frozen: the one normalisation, at construction
        candidates = [normalise_precision(c) for c in self.auto.candidates]
        for c, given in zip(candidates, self.auto.candidates, strict=True):
            need(c in PRECISIONS[1:], "auto.candidates", f"a list of {'|'.join(PRECISIONS[1:])}", given)
        object.__setattr__(self.auto, "candidates", candidates)
        try:
            check_scaler(**vars(self.scaler))
        except SettingsError as e:
            raise SettingsError(f"scaler.{e}") from None
        g = self.guard
        need(g.action in GUARD_ACTIONS, "guard.action", "one of " + "|".join(GUARD_ACTIONS), g.action)
        need(_number(g.min_scale) and g.min_scale >= 0, "guard.min_scale", ">= 0", g.min_scale)
        for key, value, low in (("guard.max_consecutive_skips", g.max_consecutive_skips, 1),
                                ("log_every", self.log_every, 1), ("checkpoint_every", self.checkpoint_every, 0),
                                ("keep", self.keep, 1)):
            need(_integer(value) and value >= low, key, f">= {low}", value)
        if self.audit in (False, "no", "false"):  # YAML 1.1 reads `audit: off` as false: the user's off
            object.__setattr__(self, "audit", "off")
        need(self.audit in AUDIT_MODES, "audit", "off, warn or strict", self.audit)
        name = self.run_name
        need(name == "" or ("/" not in name and "\\" not in name and name not in (".", "..")), "run_name",
             "a plain name (no / or \\, not . or ..): trackers write under out_dir/NAME", name)

    @property
    def scaler_kwargs(self) -> dict[str, Any]:
        """The GradScaler knobs as ``GradScalerKwargs``/``GradScaler`` keyword arguments."""
        return check_scaler(**vars(self.scaler))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def normalise_precision(name: Any) -> str | None:
    """``auto|fp32|bf16|fp16|bf16-true`` for a known spelling (``no``, ``float16``, any case), else the lowered text."""
    text = None if name is None else str(name).strip().lower()
    return ALIASES.get(text, text)


def check_scaler(init_scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any) -> dict[str, Any]:
    """The GradScaler knobs as plain numbers; a bad one, which the scaler takes silently, is a SettingsError."""
    for name, value, ok, allowed in (
            ("init_scale", init_scale, lambda v: 0 < v <= FP32_MAX,
             "a finite number > 0 and <= 3.4e38 (the scale is a float32)"),
            ("growth_factor", growth_factor, lambda v: v > 1, "> 1"),
            ("backoff_factor", backoff_factor, lambda v: 0 < v < 1, "in (0, 1)")):
        if not _number(value) or not ok(value):
            raise SettingsError(f"{name}: must be {allowed if _number(value) else 'a finite number'}, got {value!r}")
    if not _integer(growth_interval) or growth_interval < 1:
        raise SettingsError(f"growth_interval: must be >= 1 (an integer), got {growth_interval!r}")
    return {"init_scale": float(init_scale), "growth_factor": float(growth_factor),
            "backoff_factor": float(backoff_factor), "growth_interval": growth_interval}


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` says 1, true, yes, y or on (any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; values trackers cannot take (lists) as text."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
