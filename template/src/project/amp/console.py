"""What a run shows: a :class:`Status` as a Live panel or as plain lines, and ``metrics.jsonl`` and the trackers."""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .monitor import value_key
from .settings import flat

SPARK = "▁▂▃▄▅▆▇█"
METERS = ("amp/scale_headroom_bits", "amp/grad_underflow_frac", "amp/lost_update_frac")  # debug/meters.py


@dataclass
class Status:
    """Everything the panel shows; numbers are plain Python values read at a log tick."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    precision: str = "fp32"
    loss: float | None = None  # mean over the log interval (and over processes): the value in metrics.jsonl
    lr: float | None = None
    scale: float | None = None
    scale_trend: Sequence[float] = field(default_factory=list)
    skipped: int = 0
    skip_rate: float = 0.0  # whole run
    recent_skip_rate: float = 0.0  # last 100 steps
    consecutive_skips: int = 0
    grad_norm: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    peak_mem_gb: float | None = None
    world_size: int = 1
    activity: str | None = None  # what runs between log ticks, e.g. "eval 12/20" (live panel only)
    values: dict[str, float] = field(default_factory=dict)  # the loop's own values (after_step(..., name=value))
    meters: dict[str, float] = field(default_factory=dict)  # debug/meters.py: headroom, underflow, lost updates


def status(m: dict[str, float], mon: Any, progress: Any, total: int | None, precision: str, world_size: int,
           device: Any) -> Status:
    """The panel's :class:`Status` at a log tick: the tick's metrics ``m``, the monitor's statistics, the position."""
    step_time = m.get("perf/step_time_s")
    return Status(step=progress.step, total_steps=total or 0, epoch=progress.epoch, precision=precision,
                  loss=m.get("train/loss"), lr=m.get("train/lr"), scale=mon.scale, scale_trend=list(mon.trend),
                  skipped=mon.skipped, skip_rate=m["amp/skip_rate"], recent_skip_rate=mon.recent_skip_rate,
                  consecutive_skips=mon.consecutive_skips, grad_norm=mon.last_grad_norm, world_size=world_size,
                  samples_per_s=m.get("perf/samples_per_s"), tokens_per_s=m.get("perf/tokens_per_s"),
                  eta_s=(total - progress.step) * step_time if total and step_time is not None else None,
                  peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                  meters={k: v for k, v in m.items() if k in METERS},
                  values={n: m[value_key(n)] for n in mon.value_names if value_key(n) in m})


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """A sparkline of log2(values) (the loss scale moves in powers of two)."""
    vals = [math.log2(v) for v in list(values)[-width:] if v and v > 0 and math.isfinite(v)]
    lo, hi = min(vals, default=0.0), max(vals, default=0.0)  # no values: ""
    return SPARK[3] * len(vals) if hi - lo < 1e-9 else "".join(SPARK[int((v - lo) / (hi - lo) * 7)] for v in vals)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def fmt_scale(scale: float | None) -> str:
    return "-" if scale is None else str(int(scale)) if 1 <= scale < 1e9 and scale == int(scale) else f"{scale:.3g}"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _progress(s: Status, pct: bool = True) -> str:
    if not s.total_steps:  # total unknown (an epoch loop): the step alone
        return str(s.step)
    return f"{s.step}/{s.total_steps}" + (f" ({100 * s.step / s.total_steps:.0f}%)" if pct else "")


def _meters(m: dict[str, float]) -> list[str]:
    out = [f"headroom {_num(m['amp/scale_headroom_bits'], '.1f')} bits"] if "amp/scale_headroom_bits" in m else []
    return out + [f"{label} {100 * m[key]:.1f}%" for key, label in (("amp/grad_underflow_frac", "underflow"),
                  ("amp/lost_update_frac", "lost updates")) if key in m and math.isfinite(m[key])]


def _bar(activity: str, width: int = 20) -> str:
    """``"eval 5/20"`` -> ``"eval ━━━━━─────────────── 5/20"``; other text as it is."""
    label, _, count = activity.rpartition(" ")
    done, _, total = count.partition("/")
    if not (done.isdigit() and total.isdigit() and int(total) > 0):
        return activity
    filled = width * min(int(done), int(total)) // int(total)
    return f"{label} {'━' * filled}{'─' * (width - filled)} {done}/{total}"


def render(s: Status) -> Table:
    """The live panel as a two-column table."""
    t = Table(title=f"training · {s.precision} · world_size={s.world_size}", show_header=False, expand=False)
    t.add_column("field", style="bold cyan", no_wrap=True)
    t.add_column("value", no_wrap=True)
    rows: list[tuple[str, Any]] = [("step", f"{_progress(s)}  epoch {s.epoch}"), ("loss", _num(s.loss, ".4f")),
                                   ("lr", _num(s.lr, ".2e"))]
    if s.scale is not None:
        skipped = (f"{s.skipped} ({100 * s.skip_rate:.1f}% of run, {100 * s.recent_skip_rate:.0f}% of last 100)"
                   f"  in a row: {s.consecutive_skips}")
        rows += [("loss scale", f"{fmt_scale(s.scale)}  {sparkline(s.scale_trend)}"),
                 ("skipped", Text(skipped, style="bold red" if s.consecutive_skips else ""))]
    else:
        rows.append(("loss scale", f"none ({s.precision}: no loss scaling)"))
    tokens = f"  {s.tokens_per_s:,.0f} tok/s" if s.tokens_per_s else ""
    rows += [("grad norm", _num(s.grad_norm, ".3f")), ("throughput", f"{_num(s.samples_per_s, '.1f')} samples/s{tokens}")]
    rows += [("eta", fmt_duration(s.eta_s))] if s.eta_s is not None else []
    rows += [("peak memory", f"{s.peak_mem_gb:.2f} GiB")] if s.peak_mem_gb is not None else []
    rows += [("fp16 edges", " · ".join(_meters(s.meters)))] if s.meters else []
    rows += [(name, f"{value:.4g}") for name, value in s.values.items()]
    rows += [("now", _bar(s.activity))] if s.activity else []
    for name, value in rows:
        t.add_row(name, value)
    return t


def plain_line(s: Status) -> str:
    """One line per log interval, no control codes."""
    parts = [f"step {_progress(s, pct=False)}", f"loss {_num(s.loss, '.4f')}", f"lr {_num(s.lr, '.1e')}"]
    if s.scale is not None:
        parts += [f"scale {fmt_scale(s.scale)}", f"skipped {s.skipped} ({100 * s.skip_rate:.1f}%)"]
    parts += [f"gnorm {s.grad_norm:.3f}"] if s.grad_norm is not None else []
    if s.tokens_per_s:  # counted only for token inputs; otherwise samples/s
        parts.append(f"{s.tokens_per_s:,.0f} tok/s")
    elif s.samples_per_s:
        parts.append(f"{s.samples_per_s:,.1f} samples/s")
    parts += [f"eta {fmt_duration(s.eta_s)}"] if s.eta_s is not None else []  # known with a total number of steps
    return " | ".join(parts + _meters(s.meters) + [f"{name} {value:.4g}" for name, value in s.values.items()])


def summary_table(summary: dict[str, Any], title: str = "AMP summary") -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("statistic", style="bold")
    t.add_column("value")
    for key, value in ((k, v) for k, v in summary.items() if not isinstance(v, (list, dict))):
        if isinstance(value, float):
            value = fmt_scale(value) if "scale" in key else f"{value:.4g}"
        t.add_row(key, "-" if value is None else str(value))
    return t


class TrainConsole:
    """Live panel on a terminal (refreshed at most ``refresh_per_second``), plain lines otherwise."""

    def __init__(self, total_steps: int | None = None, live: bool | None = True, enabled: bool = True,
                 console: Console | None = None, refresh_per_second: float = 4.0):
        self.enabled, self.console = enabled, console or Console(stderr=False)
        self.status = Status(total_steps=total_steps or 0)
        # interactive, not just a terminal: on TERM=dumb rich's Live draws only once, at exit
        self.use_live = enabled and live is not False and self.console.is_interactive
        self._live: Live | None = None
        self._refresh = refresh_per_second

    def __enter__(self) -> TrainConsole:
        if self.use_live and self._live is None:
            # redirect_stdout: a print() in the user's loop lands above the panel instead of tearing it
            self._live = Live(render(self.status), console=self.console, refresh_per_second=self._refresh,
                              transient=False, redirect_stdout=True, redirect_stderr=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(render(self.status))
            self._live.__exit__(*exc)
            self._live = None

    def log(self, message: str, style: str | None = None) -> None:
        """Print a line above the panel (or as a plain line)."""
        if self.enabled:
            target = self._live.console if self._live is not None else self.console
            target.print(message, style=style, highlight=False, markup=False, soft_wrap=self._live is None)
            if not self.console.is_terminal:
                sys.stdout.flush()

    def update(self, status: Status) -> None:
        """Show ``status`` (a :class:`Status` built at a log tick): the panel, or one plain line."""
        if not isinstance(status, Status):
            raise TypeError(f"TrainConsole.update takes a Status, got {type(status).__name__}")
        self.status = status
        if self._live is not None:
            self._live.update(render(status))
        else:
            self.log(plain_line(status))

    def activity(self, text: str | None) -> None:
        """Show what runs between log ticks (``"eval 3/20"``) in the live panel; nothing off a terminal."""
        self.status.activity = text
        if self._live is not None:
            self._live.update(render(self.status))

    def print_table(self, table: Table) -> None:
        if self.enabled:
            (self._live.console if self._live is not None else self.console).print(table)


class JsonlTracker(GeneralTracker):
    """One JSON object per ``accelerator.log`` call, main process only (the config goes into meta.json instead)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    tracker = property(lambda self: self.path)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}, default=float) + "\n")


def run_ids(accelerator: Any) -> dict[str, str]:
    """The ids of the tracker runs in progress that can be resumed (saved in checkpoint metadata)."""
    ids = {t.name: (getattr(getattr(t, "run", None), "id", None) if t.name == "wandb" else
                    getattr(getattr(getattr(t, "active_run", None), "info", None), "run_id", None)
                    if t.name == "mlflow" else None) for t in getattr(accelerator, "trackers", [])}
    return {name: str(run_id) for name, run_id in ids.items() if run_id}


class Trackers:
    """``metrics.jsonl``, the settings' ``trackers`` and the loop's ``log_with``; ``config`` as flat hyperparameters."""

    def __init__(self, metrics: Path, settings: Any, log_with: Any = None, config: dict[str, Any] | None = None):
        user = [*settings.trackers, *([log_with] if isinstance(log_with, str) else log_with or [])]
        self.names = [t if isinstance(t, str) else t.name for t in user]
        self.log_with = [JsonlTracker(metrics), *user]  # for Accelerator(log_with=...)
        self.run_name = settings.run_name or metrics.parent.resolve().name
        self.kwargs = {k: dict(v) for k, v in (settings.tracker_kwargs or {}).items()}
        self.config, self.started = None if config is None else flat(config), False

    def start(self, accelerator: Any, meta: dict[str, Any] | None = None, step: int = 0) -> None:
        """``init_trackers`` once; after a resume W&B and MLflow continue their runs, TensorBoard drops later events."""
        if self.started or accelerator.trackers:  # the loop's own init_trackers came first: its set-up stands
            self.started = True
            return
        self.started, kwargs, ids = True, copy.deepcopy(self.kwargs), (meta or {}).get("trackers") or {}
        resumed = {"wandb": {"id": ids["wandb"], "resume": "allow"} if "wandb" in ids else {},
                   "mlflow": {"run_id": ids["mlflow"]} if "mlflow" in ids else {},
                   "tensorboard": {"purge_step": step + 1} if meta is not None else {}}  # later events: the killed run's
        for name in (n for n in self.names if resumed.get(n)):  # the settings' tracker_kwargs win
            kwargs[name] = {**resumed[name], **kwargs.get(name, {})}
        accelerator.init_trackers(self.run_name, config=self.config, init_kwargs=kwargs)
