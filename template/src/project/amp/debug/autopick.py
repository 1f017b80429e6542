"""``auto`` by measurement where the hardware cannot say which precision is fastest for *this* model: cached by machine
and probe key; with several processes the main process measures and every rank follows (docs/precision.md)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from ..precision import Resolution, _cpuinfo, cpu_bf16_feature

NOISE = 0.05  # a precision must be more than 5% faster than the rule's pick to replace it
CACHE_FILE = "auto_precision.json"


@dataclass
class Probe:
    """``run(candidates)``: seconds per optimizer step per candidate (``None``: read the cache only); ``key``: what
    the timing depends on besides the machine; ``candidates``: the precisions to weigh instead of the device's own."""

    run: Callable[[list[str]], Mapping[str, float]] | None
    key: dict[str, Any] = field(default_factory=dict)
    candidates: list[str] | None = None


def for_session(rule: Resolution, state: Any, probe: Probe | None, auto: Any) -> Resolution:
    """What a session asked for ``auto`` runs: the pick of ``probe``'s timings (the main process's, which every rank
    follows), else ``rule``, with the hint of how to time it, or why timing it failed."""
    if not auto.measure or not candidates(state.device, auto.candidates or None):
        return rule
    if probe is None:
        return untimed(rule)
    probe = Probe(probe.run, probe.key, auto.candidates or probe.candidates)
    found = _timings(state.device, probe) if state.is_main_process else (None, False, None)
    if state.num_processes > 1:  # every rank follows the main process's timings
        found = broadcast_object_list([found], from_process=0)[0]
    timings, cached, error = found
    if error == UNTIMED:
        return untimed(rule, "nothing cached for this model")
    if error or not timings:
        return replace(rule, reason=f"{rule.reason} (timing it failed: {error or 'no precision was timed'})")
    return decide(rule, timings, cached)


def _timings(device: torch.device | str, probe: Probe) -> tuple[dict[str, float] | None, bool, str | None]:
    """The main process's (timings, cached, error): from the cache, else from ``probe.run`` (then cached)."""
    key, cands = probe_key(device, probe), candidates(device, probe.candidates)
    timings = lookup(key, cands)
    if timings is not None:
        return timings, True, None
    if probe.run is None:
        return None, False, UNTIMED
    print(f"auto: timing {' and '.join(cands)} on this model, once per model and machine (a few seconds on a small "
          "model, minutes on a large one or a slow CPU) ...", flush=True)
    began = time.monotonic()
    try:
        timings = {p: float(t) for p, t in probe.run(cands).items() if p in cands}
    except Exception as e:  # the probe is advice: training goes on by the rule
        return None, False, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    finally:
        print(f"auto: timing took {time.monotonic() - began:.0f} s", flush=True)
    if timings:
        store(key, timings, {"machine": machine(device), "probe": probe.key})
    return timings, False, None


def candidates(device: torch.device | str, asked: list[str] | None = None) -> list[str]:
    """The precisions worth timing on ``device``: ``asked`` (with fp32, the reference), else the device's own set
    (never fp16 on a CPU: no fast kernels); empty where the hardware rule is certain and nothing was asked."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return []
    if asked:
        return ["fp32"] + [p for i, p in enumerate(asked) if p != "fp32" and p not in asked[:i]]
    if device.type == "cpu":
        return ["fp32", "bf16"] if cpu_bf16_feature() else []
    return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported(including_emulation=False) else ["fp32", "fp16"]


def probe_key(device: torch.device | str, probe: Probe) -> str:
    """The cache key of ``probe``'s timings on ``device`` (the candidates count only when they were asked for)."""
    asked = {"candidates": candidates(device, probe.candidates)} if probe.candidates else {}
    return cache_key(device, {**probe.key, **asked})


def machine(device: torch.device | str) -> dict[str, Any]:
    """What a timing depends on that is not the model: the device, its bf16 feature, threads, torch."""
    device = torch.device(device)
    if device.type == "cuda":
        own = {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}
    else:
        own = {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
               "feature": cpu_bf16_feature(), "threads": torch.get_num_threads()}
    return {"torch": torch.__version__, "device": device.type, **own}


def cache_dir() -> Path:
    own = os.environ.get("AMPTPL_CACHE_DIR")
    return Path(own) if own else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amptpl"


def cache_key(device: torch.device | str, probe_key: Mapping[str, Any]) -> str:
    text = json.dumps({"machine": machine(device), "probe": dict(probe_key)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}  # none yet, or damaged: measure again


def lookup(key: str, cands: list[str] | None = None) -> dict[str, float] | None:
    """The cached step times of ``cands`` (of every precision in the entry without them); None: measure again."""
    entry = _read_cache().get(key)
    timings = entry.get("step_time_s") if isinstance(entry, dict) else None
    if not isinstance(timings, dict):
        return None
    timings = {str(p): t for p, t in timings.items() if cands is None or p in cands}  # never another set's timings
    ok = timings and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in timings.values())
    if not ok or (cands is not None and len(timings) < len(cands)):
        return None  # none, damaged, or not every candidate: measure again
    return {p: float(t) for p, t in timings.items()}


def store(key: str, timings: Mapping[str, float], about: Mapping[str, Any] | None = None) -> None:
    """Add one entry (atomic replace; a cache that cannot be written only costs the next run a measurement)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = {"step_time_s": dict(timings), **(dict(about) if about else {})}
        tmp = folder / f".{CACHE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        os.replace(tmp, folder / CACHE_FILE)
    except OSError:
        pass


def decide(rule: Resolution, timings: Mapping[str, float], cached: bool) -> Resolution:
    """The fastest measured precision, unless the rule's pick is within :data:`NOISE` of it; the reason: its ratio."""
    measured = {p: t for p, t in timings.items() if t and t > 0}
    if not measured:
        return rule
    pick = min(measured, key=measured.get)  # the fastest
    if rule.effective in measured and measured[rule.effective] <= measured[pick] * (1 + NOISE):
        pick = rule.effective  # within noise of the fastest: the rule stands
    ref = "fp32" if "fp32" in measured and pick != "fp32" else next((p for p in measured if p != pick), None)
    ratio = f"{measured[ref] / measured[pick]:.2f}x {ref}" if ref else "the only one measured"
    where = "cached" if cached else "measured now"
    return Resolution(rule.requested, pick, f"timed on this model: {pick} {ratio}; {where}", rule.device_type)


UNTIMED = "untimed"  # the main process found nothing cached and had no probe to run


def untimed(rule: Resolution, why: str = "no probe") -> Resolution:
    """The rule's pick, with the one-line hint that a measurement could do better on this model."""
    return replace(rule, reason=f"{rule.reason}; not timed on this model ({why}: AmpSession(..., "
                   "probe=debug.autopick.Probe(run, key)) or the project's bench measures it)")
