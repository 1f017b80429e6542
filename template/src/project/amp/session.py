"""One AMP session around one Accelerator: precision, loss scale, checkpoints, exact resume, console, guard, stop.

:class:`AmpSession` composes the other modules of this folder. It never runs a training step for you: forward,
backward, clipping and ``optimizer.step()`` stay in your loop, and the session is told about each step afterwards.
See ``amp/__init__.py`` for the lines to add to a plain Accelerate loop.

What it owns, in order of use:
- construction: resolve the precision for this device (following ``accelerate launch --mixed_precision`` when asked
  for ``auto``) and say why; build the Accelerator (your extra keyword arguments pass through) with a GradScalerKwargs
  handler and a seedable sampler; a real CPU GradScaler for fp16 on a CPU; take ``out_dir``'s run lock;
- :meth:`prepare`: ``accelerator.prepare`` plus registering the progress and the AMP statistics for checkpointing;
- :meth:`resume`: newest complete checkpoint (``"auto"``), ``"none"`` or a path; restores step, epoch, data position,
  scaler (across precisions), RNG and statistics; a fresh start moves an earlier run's files aside, never mixes them;
- :meth:`batches`: one epoch of a loader, skipping what a resumed run already consumed;
- :meth:`after_step`: records the step without a device sync; at log ticks :meth:`tick` reads it (one sync, one
  collective), logs, updates the console and applies the collapse guard; saves every ``checkpoint_every`` steps;
  SIGTERM/SIGINT save and raise :class:`StopTraining`;
- :meth:`close`: final checkpoint, AMP summary, signal handlers restored, ``end_training()``: the one place a run ends.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import precision as _precision
from .checkpoint import CHECKPOINTS, CheckpointManager, Progress, StopSignal, find_resume, read_meta, trim_log
from .console import Status, TrainConsole, summary_table
from .distributed import any_rank
from .guard import Decision, GuardFallback, GuardPolicy, GuardStop, Problem, decide
from .monitor import AmpMonitor
from .tracking import JsonlTracker, resume_kwargs, run_ids

METRICS = "metrics.jsonl"
SUMMARY = "amp_summary.json"
LOCK = ".lock"
PREVIOUS = "previous-runs"


class StopTraining(SystemExit):
    """A stop signal was honoured: the state is saved and the run ended. Exit status 0 when not caught."""

    def __init__(self, signame: str, path: str):
        super().__init__(0)
        self.signame = signame
        self.path = path


class RunLockedError(RuntimeError):
    """Another live run holds ``out_dir``; the message is one line naming its PID and host."""


class OutputDirError(RuntimeError):
    """``out_dir`` cannot be created or written (a file in the way, a read-only filesystem); one line."""


@dataclass
class Tick:
    """What one log tick found: the metrics logged, the console status, the guard's decision, a stop request."""

    metrics: dict[str, float]
    status: Status
    decision: Decision
    stop: bool = False


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)
    step: int = 0
    samples: int = 0
    tokens: int = 0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def has_accelerator() -> bool:
    """True when torch sees a device Accelerate would use instead of the CPU (CUDA, MPS, XPU, NPU, ...)."""
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    for name in ("xpu", "npu", "mlu", "musa", "hpu", "sdaa"):
        mod = getattr(torch, name, None)
        if mod is not None and getattr(mod, "is_available", lambda: False)():
            return True
    return False


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


_EXIT = {"code": 0, "installed": False}


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _install_hard_exit() -> None:
    """Several processes: end the interpreter with ``os._exit`` once Python has run its exit handlers.

    DDP keeps gloo's worker threads alive past ``end_training()``; one that releases a finished collective while
    Python finalizes aborts the process (SIGABRT, "terminate called without an active exception") after a run
    that succeeded. The exit status is kept: ``sys.exit(n)``, an uncaught exception (1) or our own SystemExits.
    """
    if _EXIT["installed"]:
        return
    _EXIT["installed"] = True
    hook, real_exit = sys.excepthook, sys.exit

    def excepthook(kind, value, tb):
        _EXIT["code"] = _exit_status(value.code) if isinstance(value, SystemExit) else 1
        hook(kind, value, tb)

    def exit_(code: Any = None) -> None:
        _EXIT["code"] = _exit_status(code)
        real_exit(code)

    def at_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(_EXIT["code"])

    sys.excepthook, sys.exit = excepthook, exit_
    atexit.register(at_exit)


class AmpSession:
    """The AMP lifecycle around one Accelerator. See the module docstring; the attributes a loop needs are
    :attr:`accelerator`, :attr:`step`, :attr:`epoch`, :attr:`scale` and :attr:`resolution`."""

    def __init__(
        self,
        precision: str | None = None,
        out_dir: str | os.PathLike[str] = "runs/amp",
        *,
        scaler: dict[str, Any] | None = None,
        guard: str | GuardPolicy = "stop",
        log_every: int = 10,
        checkpoint_every: int = 0,
        keep: int = 3,
        max_steps: int | None = None,
        config: dict[str, Any] | None = None,
        live: bool | None = None,
        rescale_schedule_on_world_size_change: bool = False,
        run_name: str | None = None,
        tracker_kwargs: dict[str, dict] | None = None,
        tracker_config: dict[str, Any] | None = None,
        **accelerator_kwargs: Any,
    ):
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DataLoaderConfiguration, GradScalerKwargs

        if log_every < 1 or checkpoint_every < 0 or keep < 1:
            raise ValueError(f"log_every >= 1, checkpoint_every >= 0 and keep >= 1 (got {log_every}, "
                             f"{checkpoint_every}, {keep})")
        self.out_dir = Path(out_dir)
        self.policy = guard if isinstance(guard, GuardPolicy) else GuardPolicy(action=guard)
        self.log_every, self.checkpoint_every, self.keep, self.max_steps = log_every, checkpoint_every, keep, max_steps
        self.config = config
        self.rescale_schedule = rescale_schedule_on_world_size_change

        # the device first: PartialState(cpu=...) before anything builds a PartialState of its own, or a CPU-only
        # `accelerate launch --multi_gpu` gives N processes that each think they are rank 0 of 1
        cpu = bool(accelerator_kwargs.pop("cpu", False)) or _env_flag("ACCELERATE_USE_CPU") or not has_accelerator()
        state = PartialState(cpu=cpu)
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        self.resolution = _precision.resolve(precision or "auto", state.device, launcher=launcher)
        handlers = list(accelerator_kwargs.pop("kwargs_handlers", None) or [])
        theirs = next((h for h in handlers if isinstance(h, GradScalerKwargs)), None)
        if theirs is not None and scaler:
            raise ValueError("pass the GradScaler settings once: scaler={...} or a GradScalerKwargs handler")
        self.scaler_kwargs = _precision.scaler_kwargs(**{**_precision.SCALER_DEFAULTS, **(
            {k: getattr(theirs, k) for k in _precision.SCALER_DEFAULTS} if theirs is not None else scaler or {})})
        kw = _precision.accelerator_kwargs(self.resolution, None if theirs is not None else self.scaler_kwargs)
        accelerator_kwargs.setdefault("project_dir", str(self.out_dir))
        # metrics.jsonl is a tracker too: accelerator.log is the one sink for every record
        user_trackers = accelerator_kwargs.pop("log_with", None) or []
        user_trackers = [user_trackers] if isinstance(user_trackers, str) else list(user_trackers)
        self.tracker_names = [t if isinstance(t, str) else t.name for t in user_trackers]
        self.run_name = run_name or self.out_dir.resolve().name
        self.tracker_kwargs, self.tracker_config = tracker_kwargs or {}, tracker_config
        self._trackers_started = False
        accelerator_kwargs["log_with"] = [JsonlTracker(self.out_dir / METRICS), *user_trackers]
        # a seeded sampler: the data order depends only on (seed, epoch), so a resume is exact
        accelerator_kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True))
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=kw["mixed_precision"],
                                       kwargs_handlers=kw["kwargs_handlers"] + handlers, **accelerator_kwargs)
        acc = self.accelerator
        _precision.install_cpu_fp16_scaler(acc, self.scaler_kwargs)  # before prepare, or fp16 on CPU is fp32
        self.is_main = acc.is_main_process
        if acc.num_processes > 1:
            _install_hard_exit()

        self.console = TrainConsole(max_steps, live=live, enabled=self.is_main)
        self.progress = Progress()
        self.monitor = AmpMonitor(acc.scaler)
        self.ckpt: CheckpointManager | None = None
        self._stop = StopSignal()
        self._closed = False
        self._entered = False
        self._lock_taken = False
        self._last_saved: int | None = None
        self._warned: str | None = None
        self._native_bf16: bool | None = None
        self._micro_loss: torch.Tensor | float | None = None
        self._micro_n = 0
        self._grad_norm: Any = None
        self._clock = _Clock()
        self._scheduler: Any = None
        self._optimizer: Any = None
        try:
            self._take_lock()
        except BaseException:
            self._stop.restore()
            raise
        self.say(self.resolution.line())
        scaler_name = type(acc.scaler).__name__ if acc.scaler is not None else "none"
        self.say(f"world_size={acc.num_processes} distributed_type={acc.distributed_type.value} "
                 f"device={acc.device} scaler={scaler_name}")

    # ------------------------------------------------------------------ state a loop reads

    @property
    def step(self) -> int:
        """Optimizer steps done (restored on resume)."""
        return self.progress.step

    @property
    def epoch(self) -> int:
        """The epoch the data position is in (restored on resume)."""
        return self.progress.epoch

    @property
    def scale(self) -> float | None:
        """The loss scale as of the last log tick (None without loss scaling)."""
        return self.monitor.scale

    def say(self, message: str, style: str | None = None) -> None:
        """Print one line on the main process (above the live panel when there is one)."""
        self.console.log(message, style=style)

    # ------------------------------------------------------------------ the run lock

    def _take_lock(self) -> None:
        """One run per out_dir: ``out_dir/.lock`` holds the PID and host; a lock whose process is gone is stale."""
        error: RuntimeError | None = None
        if self.is_main:
            try:
                self._lock_taken = _acquire_lock(self.out_dir / LOCK)
            except RunLockedError as e:
                error = e
            except OSError as e:
                error = OutputDirError(f"{self.out_dir}: cannot be used as the output directory ({e.strerror or e})")
        if any_rank(self.accelerator, error is not None):
            raise error or RunLockedError(f"{self.out_dir} is locked by another run (seen by the main process)")

    def _release_lock(self) -> None:
        if self._lock_taken:
            path = self.out_dir / LOCK
            try:
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
            except (OSError, ValueError):
                pass
            self._lock_taken = False

    # ------------------------------------------------------------------ prepare and resume

    def prepare(self, *objects: Any) -> Any:
        """``accelerator.prepare(...)``, then register what a checkpoint must hold. Returns what prepare returns."""
        acc = self.accelerator
        prepared = acc.prepare(*objects)
        items = prepared if isinstance(prepared, tuple) else (prepared,)
        model = next((o for o in items if isinstance(o, torch.nn.Module)), None)
        self._optimizer = next((o for o in items if hasattr(o, "param_groups")), None)
        self._scheduler = next((o for o in items if hasattr(o, "get_last_lr")), None)
        self.monitor = AmpMonitor(acc.scaler, scale_fn=_precision.engine_loss_scale(acc, model))
        for opt in acc._optimizers:
            _fix_skip_flag(opt, acc.scaler)
        if self.ckpt is None:
            acc.register_for_checkpointing(self.progress, self.monitor)
            self.ckpt = CheckpointManager(acc, self.out_dir, self.keep, self._meta)
        return prepared

    def find_checkpoint(self, policy: str = "auto") -> tuple[Path | None, list[str]]:
        """The checkpoint :meth:`resume` would load for ``policy`` (``auto``, ``none`` or a path), with notices."""
        return find_resume(self.out_dir, policy)

    def resume(self, policy: str | os.PathLike[str] = "auto", *, check: Any = None) -> list[str]:
        """Resume from ``policy``: ``"auto"`` (newest complete checkpoint in out_dir), ``"none"``, or a path.

        ``check(meta)`` may inspect the chosen checkpoint's meta.json first and return notices or raise to refuse.
        Prints and returns the notices. A fresh start moves an earlier run's files in out_dir aside.
        """
        if self.ckpt is None:
            raise RuntimeError("call AmpSession.prepare(...) before resume()")
        path, notices = find_resume(self.out_dir, str(policy))
        if path is not None and check is not None:
            notices += list(check(read_meta(path)) or [])
        if path is not None and Path(path).resolve().parent != (self.out_dir / CHECKPOINTS).resolve():
            # a checkpoint from elsewhere starts another line of runs here: the one in out_dir moves aside
            notices += self._move_previous_run_aside(f"resume from {path}")
        if path is not None:
            notices += self.ckpt.load(path, self.resolution.effective,
                                      self.scaler_kwargs if self.resolution.uses_scaler else None,
                                      rescale_schedulers=self.rescale_schedule)
            self._last_saved = self.progress.step
            if self.is_main and (n := trim_log(self.out_dir / METRICS, self.progress.step)):
                notices.append(f"resume: dropped {n} {METRICS} records logged after step {self.progress.step}")
        else:
            notices += self._move_previous_run_aside()
        self.monitor.sync_scale()  # the scale in effect now, restored or fresh
        for line in notices:
            self.say(line)
        self._start_trackers(read_meta(path) if path is not None else None)
        self._clock = _Clock(step=self.progress.step, samples=self.progress.samples_seen,
                             tokens=self.progress.tokens_seen)
        return notices

    def _move_previous_run_aside(self, why: str = "fresh start") -> list[str]:
        """A fresh start never mixes with or deletes an earlier run: everything it left in out_dir (checkpoints,
        metrics.jsonl, the summary, tracker logs, an export) moves to out_dir/previous-runs/<time>/."""
        notices: list[str] = []
        if self.is_main and self.out_dir.is_dir():
            old = sorted(p for p in self.out_dir.iterdir() if p.name not in (LOCK, PREVIOUS))
            if old:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
                dest = self.out_dir / PREVIOUS / stamp
                dest.mkdir(parents=True)
                for p in old:
                    os.replace(p, dest / p.name)
                notices.append(f"{why}: the earlier run's files in {self.out_dir} "
                               f"({', '.join(p.name for p in old)}) were moved to {dest}")
        self.accelerator.wait_for_everyone()
        return notices

    # ------------------------------------------------------------------ data

    def batches(self, loader: Any):
        """Yield one epoch of ``loader`` from the saved position; at its end the epoch counter moves on.

        A seedable sampler's order depends only on (seed, epoch), so skipping the batches a resumed run already
        consumed gives exactly the batches an uninterrupted run would have seen.
        """
        p = self.progress
        source = self.accelerator.skip_first_batches(loader, p.batch_in_epoch) if p.batch_in_epoch else loader
        if hasattr(source, "set_epoch"):
            source.set_epoch(p.epoch)
        for batch in source:
            p.batch_in_epoch += 1
            samples, tokens = _count(batch)
            p.samples_seen += samples * self.accelerator.num_processes
            p.tokens_seen += tokens * self.accelerator.num_processes
            yield batch
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0

    # ------------------------------------------------------------------ each step

    def after_step(self, loss: Any = None, grad_norm: Any = None) -> None:
        """Call after each ``optimizer.step()`` (every micro-batch under ``accelerator.accumulate``).

        Reads nothing from the device. Counts an optimizer step when gradients synced; at log ticks runs
        :meth:`tick` and applies the guard; saves every ``checkpoint_every`` steps; honours a stop signal.
        """
        if loss is not None:
            loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
            self._micro_loss = loss if self._micro_loss is None else self._micro_loss + loss
            self._micro_n += 1
        if grad_norm is not None:
            self._grad_norm = grad_norm
        if not self.accelerator.sync_gradients:
            return
        if not self._entered:
            self.console.__enter__()
            self._entered = True
        self.progress.step += 1
        step = self.progress.step
        mean_loss = None if self._micro_loss is None else self._micro_loss / self._micro_n
        self.monitor.record(step, mean_loss, self._grad_norm)
        self._micro_loss, self._micro_n, self._grad_norm = None, 0, None

        tick = None
        if step % self.log_every == 0 or step == self.max_steps:
            tick = self.tick()
            self._apply(tick.decision)
        # one process: every step; several: only at ticks, where every rank takes part in the collective
        stop = tick.stop if tick is not None else (self.accelerator.num_processes == 1 and self._stop.signame)
        if stop:
            path = self.save(quiet=True)
            name = self._stop.signame or "a stop signal on another process"
            self.say(f"stopped by {name} at step {step}; state saved to {path}. "
                     "Run the same command again to resume from it")
            self.close(completed=False)
            _EXIT["code"] = 0
            raise StopTraining(name, str(path))
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            self.save()

    def tick(self) -> Tick:
        """Read the interval's values (one sync), agree across processes (one collective), log, show, judge."""
        acc = self.accelerator
        m = self.monitor.flush()
        lr = self._lr()
        if lr is not None:
            m["train/lr"] = lr
        problem = self.monitor.check(self.policy.min_scale, self.policy.max_consecutive_skips)
        stop = self._stop.signame is not None
        if acc.num_processes > 1:
            loss = m.get("train/loss")
            vec = torch.tensor([0.0 if loss is None else loss, float(loss is not None), float(problem is not None),
                                float(stop)], device=acc.device)
            total = acc.reduce(vec, "sum").tolist()
            if total[1]:
                m["train/loss"] = total[0] / total[1]
            if problem is None and total[2]:
                problem = Problem("other_rank", "another process tripped the AMP guard")
            stop = total[3] > 0
        m.update(self._perf())
        decision = decide(self.policy, problem, precision=self.resolution.effective,
                          native_bf16=self._bf16_native(), warned=self._warned)
        self._warned = None if problem is None else (problem.kind if decision.action in ("warn", "ok") else None)
        self.log(m)
        status = self._status(m)
        self.console.update(status)
        return Tick(m, status, decision, stop)

    def _apply(self, decision: Decision) -> None:
        if decision.action == "warn":
            self.say(f"warning: {decision.problem.message} (the AMP guard only warns)", style="yellow")
        elif decision.action in ("stop", "fallback"):
            self.say(self.monitor.diagnosis(decision.problem, self.resolution.effective), style="red")
            path = str(self.save(quiet=True))
            if decision.action == "fallback":
                self.say(f"AMP guard: saved {path}; continuing in {decision.to}")
                exc: SystemExit = GuardFallback(decision.problem, decision.to, path, self.step,
                                                self.resolution.effective)
            else:
                self.say(f"stopped by the AMP guard; state saved to {path}")
                exc = GuardStop(decision.problem, path)
            self.close(completed=False)
            _EXIT["code"] = 3
            raise exc

    def _start_trackers(self, meta: dict[str, Any] | None) -> None:
        """``init_trackers`` once; a resumed run continues its tracker runs (W&B id, TensorBoard purge_step)."""
        if self._trackers_started:
            return
        self._trackers_started = True
        kwargs = resume_kwargs(self.tracker_names, self.tracker_kwargs, (meta or {}).get("trackers"),
                               self.progress.step if meta is not None else None)
        self.accelerator.init_trackers(self.run_name, config=self.tracker_config, init_kwargs=kwargs)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` (``split/name`` keys) at ``step`` (default: now) through ``accelerator.log``: every
        tracker and out_dir/metrics.jsonl."""
        self._start_trackers(None)
        self.accelerator.log(metrics, step=self.step if step is None else step)

    def _lr(self) -> float | None:
        if self._scheduler is not None:
            return float(self._scheduler.get_last_lr()[0])
        if self._optimizer is not None:
            return float(self._optimizer.param_groups[0]["lr"])
        return None

    def _perf(self) -> dict[str, float]:
        """Wall time per optimizer step and throughput over all processes since the last tick."""
        c, p = self._clock, self.progress
        now = time.perf_counter()
        steps = p.step - c.step
        out = {"perf/elapsed_s": now - c.start}
        if steps > 0:
            dt = max(now - c.last, 1e-9)
            out.update({"perf/step_time_s": dt / steps, "perf/samples_per_s": (p.samples_seen - c.samples) / dt,
                        "perf/tokens_per_s": (p.tokens_seen - c.tokens) / dt})
        c.last, c.step, c.samples, c.tokens = now, p.step, p.samples_seen, p.tokens_seen
        return out

    def _status(self, m: dict[str, float]) -> Status:
        mon, step_time = self.monitor, m.get("perf/step_time_s")
        eta = (self.max_steps - self.step) * step_time if self.max_steps and step_time is not None else None
        return Status(
            step=self.step, total_steps=self.max_steps or 0, epoch=self.epoch, precision=self.resolution.effective,
            loss=m.get("train/loss"), lr=m.get("train/lr"), scale=mon.scale, scale_trend=list(mon.trend),
            skipped=mon.skipped, skip_rate=m["amp/skip_rate"], recent_skip_rate=mon.recent_skip_rate,
            consecutive_skips=mon.consecutive_skips, grad_norm=mon.last_grad_norm,
            samples_per_s=m.get("perf/samples_per_s"), tokens_per_s=m.get("perf/tokens_per_s"), eta_s=eta,
            peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if self.accelerator.device.type == "cuda" else None,
            world_size=self.accelerator.num_processes,
        )

    def _bf16_native(self) -> bool:
        if self._native_bf16 is None:
            self._native_bf16 = _precision.native_bf16(self.accelerator.device)
        return self._native_bf16

    # ------------------------------------------------------------------ checkpoints and the end

    def _meta(self) -> dict[str, Any]:
        res = self.resolution
        return {"step": self.progress.step, "epoch": self.progress.epoch, "template_version": __version__,
                "precision": {"requested": res.requested, "effective": res.effective, "reason": res.reason},
                "scaler_kwargs": self.scaler_kwargs if res.uses_scaler else None,
                "precision_switches": self.monitor.switches, "torch": torch.__version__,
                "accelerate": _version("accelerate"), "config": self.config,
                "trackers": run_ids(self.accelerator)}

    def save(self, quiet: bool = False) -> Path:
        """Save everything a resume needs as ``out_dir/checkpoints/step_NNNNNNN`` (every process must call it)."""
        if self.ckpt is None:
            raise RuntimeError("call AmpSession.prepare(...) before save()")
        path = self.ckpt.root / f"step_{self.step:07d}"
        if self._last_saved == self.step and path.is_dir():
            return path
        path = self.ckpt.save(self.step)
        self._last_saved = self.step
        if not quiet:
            self.say(f"checkpoint: {path}")
        return path

    def summary(self) -> dict[str, Any]:
        """The run's AMP statistics (what :meth:`close` writes to out_dir/amp_summary.json)."""
        acc = self.accelerator
        out = {"precision": self.resolution.effective, **self.monitor.summary(),
               "precision_switches": self.monitor.switches}
        if acc.num_processes > 1:  # the scaler sees all-reduced gradients: every rank skips the same steps
            skipped = acc.gather(torch.tensor([self.monitor.skipped], device=acc.device))
            out["amp/skipped_steps_per_rank"] = skipped.tolist()
        return out

    def close(self, completed: bool = True) -> None:
        """End the run: final checkpoint and AMP summary (when ``completed``), then restore the signal handlers,
        leave the console, release the lock and ``end_training()``. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if completed and self.ckpt is not None:
                if self.step > 0 and self._last_saved != self.step:
                    self.save()
                summary = self.summary()
                self._leave_console()  # the final panel first, the summary below it
                if self.is_main:
                    (self.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
                    self.console.print_table(summary_table(summary))
                self.accelerator.wait_for_everyone()
        finally:
            self._stop.restore()
            self._leave_console()
            self._release_lock()
            self.accelerator.end_training()

    def _leave_console(self) -> None:
        if self._entered:
            self._entered = False
            self.console.__exit__(None, None, None)

    def __enter__(self) -> AmpSession:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        # an exception (not our own clean SystemExits) ends the run without a final save or summary
        self.close(completed=kind is None)


# ----------------------------------------------------------------------------
# helpers


def _fix_skip_flag(opt: Any, scaler: Any) -> None:
    """Keep ``step_was_skipped`` (and so the scheduler's hold on skipped steps) right for fused optimizers.

    A fused optimizer takes the GradScaler's inf check into its own kernel, so Accelerate sees its step called and
    reports "not skipped" on an overflow (accelerate #4242): the schedule would advance on skipped steps. Here the
    skip is read off the scale instead (it backs off exactly on a skipped step): one small device read per
    optimizer step, in this configuration only.
    """
    inner = getattr(opt, "optimizer", None)
    if scaler is None or not getattr(inner, "_step_supports_amp_scaling", False) or getattr(opt, "_amp_fixed", False):
        return
    step = opt.step

    def checked_step(*args: Any, **kwargs: Any) -> Any:
        if not opt.gradient_state.sync_gradients or getattr(scaler, "_scale", None) is None:
            return step(*args, **kwargs)
        before = scaler._scale.clone()
        out = step(*args, **kwargs)
        opt._is_overflow = bool((scaler._scale < before).item())
        return out

    opt.step = checked_step
    opt._amp_fixed = True


def _count(batch: Any) -> tuple[int, int]:
    """(samples, tokens) of a batch: the leading size of its first tensor; tokens for integer (B, T) inputs."""
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        return 0, 0
    tokens = first.numel() if first.dim() == 2 and not first.is_floating_point() else 0
    return first.shape[0], tokens


def _first_tensor(batch: Any) -> torch.Tensor | None:
    """The batch itself, or the first tensor of a tuple/list or a mapping (a dict, a BatchEncoding)."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if hasattr(batch, "values") else batch if isinstance(batch, (list, tuple)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire_lock(path: Path) -> bool:
    """Create ``path`` exclusively with our PID and host; replace it when its process is gone (same host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
                pid, host = int(other["pid"]), str(other["host"])
            except (OSError, ValueError, KeyError, TypeError):
                other, pid, host = {}, -1, ""
            if pid == os.getpid() and host == me["host"]:
                return False  # this process holds it already (a run restarted in the same process)
            if pid > 0 and host == me["host"] and _pid_alive(pid):
                raise RunLockedError(
                    f"{path.parent} is in use by a run with PID {pid} on {host} (since {other.get('started', '?')}); "
                    "wait for it to finish, stop it, or use another output directory") from None
            if pid > 0 and host != me["host"]:
                raise RunLockedError(
                    f"{path.parent} is in use by a run with PID {pid} on host {host}; if that run is gone, "
                    f"delete {path}") from None
            path.unlink(missing_ok=True)  # stale: its process is gone (or the file is unreadable)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    raise RunLockedError(f"could not take the lock {path}; another run keeps creating it")


__all__ = ["AmpSession", "OutputDirError", "RunLockedError", "StopTraining", "Tick", "GuardStop", "GuardFallback", "has_accelerator"]
