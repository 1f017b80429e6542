"""The collapse-guard policy: what to do when the loss scale collapses or the loss stays non-finite.

The monitor *detects* (:meth:`AmpMonitor.check` returns a :class:`Problem`); :func:`decide` is the whole policy, a
pure function of the settings, the problem and the precision in effect:

    decision = decide(GuardPolicy(action="fallback"), problem, precision="fp16", native_bf16=True, warned=None)
    decision.action   # "ok" | "warn" | "stop" | "fallback";  decision.to == "bf16" for a fallback

A warning is given once per kind of problem until the problem clears; ``stop`` and ``fallback`` reach the caller
as exceptions (:class:`GuardStop`, :class:`GuardFallback`), raised by the session after it saved a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("warn", "stop", "fallback")


@dataclass(frozen=True)
class GuardPolicy:
    """When the guard trips and what it does then."""

    action: str = "stop"  # warn | stop | fallback
    min_scale: float = 2.0**-14  # a GradScaler scale below this has collapsed
    max_consecutive_skips: int = 25  # skipped steps (or non-finite losses) in a row

    def __post_init__(self) -> None:
        # messages start with the setting's name: a project's config prefixes its section (amp.guard.)
        if self.action not in ACTIONS:
            raise ValueError(f"action: must be one of {'|'.join(ACTIONS)}, got {self.action!r}")
        if not self.min_scale >= 0:
            raise ValueError(f"min_scale: must be >= 0, got {self.min_scale!r}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips: must be >= 1, got {self.max_consecutive_skips!r}")


@dataclass(frozen=True)
class Problem:
    """What the monitor saw: a stable ``kind`` (for warn-once) and a message with the numbers."""

    kind: str  # "scale_collapsed" | "skips" | "nonfinite_loss"
    message: str


@dataclass(frozen=True)
class Decision:
    action: str  # ok | warn | stop | fallback
    problem: Problem | None = None
    to: str | None = None  # the precision to fall back to


def fallback_target(precision: str, native_bf16: bool) -> str | None:
    """fp16 -> bf16 where the device runs it natively, else fp32; bf16 and bf16-true -> fp32; fp32 -> None."""
    if precision == "fp16":
        return "bf16" if native_bf16 else "fp32"
    if precision in ("bf16", "bf16-true"):
        return "fp32"
    return None


def decide(policy: GuardPolicy, problem: Problem | None, *, precision: str, native_bf16: bool,
           warned: str | None) -> Decision:
    """The guard's decision for this log tick. ``warned``: the kind already warned about (warn once per kind).

    A fallback with nowhere to go (already fp32) stops instead. A loss that stays non-finite without loss scaling
    (fp32, bf16) stops even under ``warn``: every such step already wrote NaN into the weights, so going on
    would only end in a run that exits 0 with a ruined model.
    """
    if problem is None:
        return Decision("ok")
    if policy.action == "warn" and not (problem.kind == "nonfinite_loss" and precision != "fp16"):
        return Decision("ok" if problem.kind == warned else "warn", problem)
    if policy.action == "fallback":
        to = fallback_target(precision, native_bf16)
        if to is not None:
            return Decision("fallback", problem, to)
    return Decision("stop", problem)


class GuardStop(SystemExit):
    """The guard stopped the run (after saving). Exit status 3 when not caught."""

    def __init__(self, problem: Problem, path: str | None):
        super().__init__(3)
        self.problem = problem
        self.path = path


class GuardFallback(SystemExit):
    """The guard asks to continue in another precision from the checkpoint at ``path``. Exit status 3 when not caught."""

    def __init__(self, problem: Problem, to: str, path: str, step: int, precision: str):
        super().__init__(3)
        self.problem = problem
        self.to = to
        self.path = path
        self.step = step
        self.precision = precision  # the precision that collapsed

    def record(self) -> dict:
        """The switch as recorded in checkpoint metadata and the summary."""
        return {"step": self.step, "from": self.precision, "to": self.to, "reason": self.problem.message,
                "path": self.path}
