"""The facts the core and a project's config share, importable without torch (a config error stays fast).

Precision names and their aliases, the GradScaler's defaults and the checks on its knobs, and what an environment
variable must say to count as "on". Each fact lives here once; ``precision.py``, the session and a project's
``config.py`` read it from here.
"""

from __future__ import annotations

import math
import os
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-true")
# other spellings users and launchers give the same precisions (Accelerate's "no" is fp32)
ALIASES = {"no": "fp32", "float32": "fp32", "fp32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
           "float16": "fp16", "auto": "auto", "bf16-true": "bf16-true", "bf16_true": "bf16-true"}
# precisions that store the weights in low precision (float32 master weights in the optimizer: amp/master.py)
LOW_WEIGHTS = {"bf16-true": "bfloat16"}
# the precision audit after the first step (amp/audit.py): skipped, a warning, or an error
AUDIT_MODES = ("off", "warn", "strict")

# torch.amp.GradScaler's own defaults: the config's defaults are these, not a copy
SCALER_DEFAULTS: dict[str, Any] = {"init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                   "growth_interval": 2000}
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the scale is a float32

TRUTHY = ("1", "true", "yes", "y", "on")


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` says 1, true, yes, y or on (any case)."""
    return os.environ.get(name, "").strip().lower() in TRUTHY


def normalise_precision(name: Any) -> str | None:
    """``auto|fp32|bf16|fp16`` for a known spelling (``no``, ``float16``, any case), the lowered text otherwise."""
    if name is None:
        return None
    text = str(name).strip().lower()
    return ALIASES.get(text, text)


def check_scaler(init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int) -> dict[str, Any]:
    """The GradScaler knobs as plain numbers, checked; a bad one raises ValueError ``"KNOB: must be ..., got X"``.

    A bad value would not fail loudly in the scaler: it would silently misreport skipped steps or never recover.
    """
    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value!r}")
        return float(value)

    init, growth, backoff = (number(k, v) for k, v in
                             (("init_scale", init_scale), ("growth_factor", growth_factor),
                              ("backoff_factor", backoff_factor)))
    if not 0 < init <= FP32_MAX:
        raise ValueError(f"init_scale: must be a finite number > 0 and <= 3.4e38 (the scale is a float32), "
                         f"got {init_scale!r}")
    if not growth > 1:
        raise ValueError(f"growth_factor: must be > 1, got {growth_factor!r}")
    if not 0 < backoff < 1:
        raise ValueError(f"backoff_factor: must be in (0, 1), got {backoff_factor!r}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval: must be >= 1 (an integer), got {growth_interval!r}")
    return {"init_scale": init, "growth_factor": growth, "backoff_factor": backoff, "growth_interval": growth_interval}


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; values trackers cannot take (lists) as text."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
