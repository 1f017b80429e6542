"""One AMP session around one Accelerator: the thin coordinator of this folder's modules.

:class:`AmpSession` never runs a training step for you: forward, loss, backward, clipping and ``optimizer.step()``
stay in your loop, and the session is told about each step afterwards. ``amp/__init__.py`` states the contract
with a loop; what each part does lives in its own module:

- ``precision``: the precision for this device and why, GradScalerKwargs, the CPU fp16 GradScaler;
- ``rundir``: one run per ``out_dir`` (the lock), a fresh start that moves an earlier run aside;
- ``checkpoint``: atomic checkpoints, resume across precisions, verification;
- ``position``: the data position, and batches from any iterable that resume exactly;
- ``monitor`` and ``guard``: loss scale and overflow statistics, the collapse guard's policy;
- ``signals``: SIGTERM/SIGINT/SIGHUP become a save and a stop the loop sees;
- ``loopcheck``: mistakes a loop can make under fp16, found without a per-step device read;
- ``console`` and ``tracking``: the live panel or plain lines, ``metrics.jsonl`` and the trackers.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import autopick as _autopick
from . import precision as _precision
from .audit import Audit, AuditError
from .checkpoint import CHECKPOINTS, CheckpointManager, find_resume, read_meta, trim_log
from .console import Status, TrainConsole, summary_table
from .defaults import SCALER_DEFAULTS, env_flag, normalise_precision
from .distributed import any_rank
from .guard import Decision, GuardFallback, GuardPolicy, GuardStop, Problem, decide
from .loopcheck import LoopChecks
from .master import MasterWeights
from .meters import Meters
from .monitor import AmpMonitor, value_key
from .position import EpochIterator, LoopError, Progress, count, fingerprint
from .rundir import OutputDirError, RunDir, RunLockedError, move_aside
from .signals import StopSignal, shield_workers
from .tracking import Trackers, run_ids

METRICS = "metrics.jsonl"
METERS = ("amp/scale_headroom_bits", "amp/grad_underflow_frac", "amp/lost_update_frac")
SUMMARY = "amp_summary.json"


class StopTraining(SystemExit):
    """Raised only when a loop goes on after a stop signal was honoured (its state saved): exit status 0."""

    def __init__(self, signame: str, path: str):
        super().__init__(0)
        self.signame = signame
        self.path = path


@dataclass
class Stop:
    """Why and where a run stopped early: a stop signal (exit status 0) or the collapse guard (3)."""

    reason: str  # "signal" | "guard"
    step: int
    path: str  # the checkpoint saved at the stop
    signame: str | None = None
    decision: Decision | None = None
    precision: str | None = None  # the precision in effect when the guard tripped

    @property
    def exit_code(self) -> int:
        return 3 if self.reason == "guard" else 0

    def exception(self) -> SystemExit:
        """The SystemExit that ends the process with this stop's status."""
        d = self.decision
        if self.reason == "signal" or d is None or d.problem is None:
            return StopTraining(self.signame or "a stop signal", self.path)
        if d.action == "fallback" and d.to is not None:
            return GuardFallback(d.problem, d.to, self.path, self.step, self.precision or "?")
        return GuardStop(d.problem, self.path)


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


class AmpSession:
    """The AMP lifecycle around one Accelerator; see ``amp/__init__.py`` for the contract with a loop.

    A loop reads :attr:`accelerator`, :attr:`step`, :attr:`epoch`, :attr:`scale`, :attr:`stop` (None, or why the run
    stopped early) and :attr:`resolution` (the precision asked for, in effect, and why).

    ``precision="auto"`` picks by hardware (amp/precision.py); with ``auto_probe=autopick.Probe(run, key)`` it times
    the candidates on your model where the hardware alone cannot say, and caches the result (amp/autopick.py);
    without one the precision line says how to time it (``auto_probe=False``: keep the rule, without that hint).
    """

    def __init__(
        self,
        precision: str | None = None,
        out_dir: str | os.PathLike[str] = "runs/amp",
        *,
        scaler: dict[str, Any] | None = None,
        guard: str | GuardPolicy = GuardPolicy.action,
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
        auto_probe: Any = None,
        audit: str = "warn",
        meters: bool = True,
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
        cpu = bool(accelerator_kwargs.pop("cpu", False)) or env_flag("ACCELERATE_USE_CPU") or not has_accelerator()
        state = PartialState(cpu=cpu)
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        self.resolution = _precision.resolve(precision or "auto", state.device, launcher=launcher)
        chosen = normalise_precision(precision or "auto") != "auto" or normalise_precision(launcher) in ("bf16", "fp16")
        if auto_probe and not chosen:  # auto, and the launcher did not choose: time it (amp/autopick.py)
            self.resolution = _auto_by_measurement(self.resolution, state, auto_probe)
        elif auto_probe is None and not chosen and _autopick.candidates(state.device):  # say how to time it
            self.resolution = _autopick.untimed(self.resolution)
        handlers = list(accelerator_kwargs.pop("kwargs_handlers", None) or [])
        theirs = next((h for h in handlers if isinstance(h, GradScalerKwargs)), None)
        if theirs is not None and scaler:
            raise ValueError("pass the GradScaler settings once: scaler={...} or a GradScalerKwargs handler")
        knobs = {k: getattr(theirs, k) for k in SCALER_DEFAULTS} if theirs is not None else scaler or {}
        self.scaler_kwargs = _precision.scaler_kwargs(**knobs)
        kw = _precision.accelerator_kwargs(self.resolution, None if theirs is not None else self.scaler_kwargs)
        accelerator_kwargs.setdefault("project_dir", str(self.out_dir))
        # metrics.jsonl is a tracker too: accelerator.log is the one sink for every record
        self.trackers = Trackers(self.out_dir / METRICS, accelerator_kwargs.pop("log_with", None),
                                 run_name or self.out_dir.resolve().name, tracker_kwargs, tracker_config)
        accelerator_kwargs["log_with"] = self.trackers.log_with
        # a seeded sampler: the data order depends only on (seed, epoch), so a resume is exact
        accelerator_kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True))
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=kw["mixed_precision"],
                                       kwargs_handlers=kw["kwargs_handlers"] + handlers, **accelerator_kwargs)
        acc = self.accelerator
        _precision.install_cpu_fp16_scaler(acc, self.scaler_kwargs)  # before prepare, or fp16 on CPU is fp32
        self.is_main = acc.is_main_process

        self.console = TrainConsole(max_steps, live=live, enabled=self.is_main)
        self.progress = Progress()
        self.monitor = AmpMonitor(acc.scaler)
        self.checks = LoopChecks(acc)
        self.ckpt: CheckpointManager | None = None
        self.stop: Stop | None = None
        self._signal = StopSignal()
        self._rundir = RunDir(self.out_dir)
        self._closed = False
        self._entered = False
        self._last_saved: int | None = None
        self._warned: str | None = None
        self._native_bf16: bool | None = None
        self._micro: dict[str, Any] = {}  # this optimizer step's micro-batch sums: loss and the loop's values
        self._micro_n = 0
        self._grad_norm: Any = None
        self._pending_counts = [0, 0]  # samples and tokens counted by batches() since the last optimizer step
        # of this process's first batch (or, for batches without a tensor, its first loss), compared across
        # processes at the first tick: equal everywhere means the data is not split
        self._fingerprint: Any = None
        self._fingerprinted = False
        self._last_iterator: list[Any] = []
        self._tracked: dict[str, Any] = {}
        self._tracked_state: dict[str, Any] = {}  # loaded for names not tracked yet
        self._meter_stats: dict[str, float] = {}
        self._clock = _Clock()
        self._scheduler: Any = None
        self._optimizer: Any = None
        self.master = MasterWeights(self.resolution.weights_dtype or torch.bfloat16)  # used by bf16-true only
        # the precision audit after the first step, and the meters read at log ticks (amp/audit.py, amp/meters.py)
        deepspeed = "DEEPSPEED" in str(acc.distributed_type)  # its engine owns the weights' and state's precision
        self.audit = Audit(self.resolution.effective, "off" if deepspeed else audit)
        self.meters = Meters() if meters else None
        self.master.meters = self.meters
        self._wrap_backward()
        try:
            self._take_lock()
        except BaseException:
            self._signal.restore()
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
        """Epochs done, from 0: the index of the epoch in progress (restored on resume)."""
        return self.progress.epoch

    @property
    def scale(self) -> float | None:
        """The loss scale as of the last log tick (None without loss scaling)."""
        return self.monitor.scale

    @property
    def should_stop(self) -> bool:
        """True once the run stopped early (a stop signal, the collapse guard): its state is saved, end the loop."""
        return self.stop is not None

    def say(self, message: str, style: str | None = None) -> None:
        """Print one line on the main process (above the live panel when there is one)."""
        self.console.log(message, style=style)

    def _take_lock(self) -> None:
        error: Exception | None = None
        if self.is_main:
            try:
                self._rundir.acquire()
            except (RunLockedError, OutputDirError, OSError) as e:
                error = e
        if any_rank(self.accelerator, error is not None):  # every process learns it: none waits on the others
            raise error or RunLockedError(f"{self.out_dir} cannot be used (seen by the main process)")

    # ------------------------------------------------------------------ prepare, track and resume

    def prepare(self, *objects: Any) -> Any:
        """``accelerator.prepare(...)``; the session then knows the optimizer and scheduler and can checkpoint.
        Returns what prepare returns."""
        acc = self.accelerator
        if self.resolution.weights_dtype is not None:  # bf16-true: bf16 model, float32 masters (amp/master.py)
            self._low_precision_weights(objects)
        prepared = acc.prepare(*objects)
        if self.master:
            self.master.follow_device()
        items = prepared if isinstance(prepared, tuple) else (prepared,)
        model = next((o for o in items if isinstance(o, torch.nn.Module)), None)
        self._optimizer = next((o for o in items if hasattr(o, "param_groups")), self._optimizer)
        self._scheduler = next((o for o in items if hasattr(o, "get_last_lr")), self._scheduler)
        for item in items:
            shield_workers(item)
        scale_fn = _precision.engine_loss_scale(acc, model)
        if scale_fn is not None:  # DeepSpeed fp16 owns its loss scale; the engine is known only now
            self.monitor = AmpMonitor(acc.scaler, scale_fn=scale_fn)
        for opt in acc._optimizers:
            _precision.fix_skip_flag(opt, acc.scaler)
        self.checks.wrap_optimizers()
        if self.audit.mode != "off" and self.audit.result is None:
            self.audit.watch([o for o in items if isinstance(o, torch.nn.Module)],
                             [o for o in items if hasattr(o, "param_groups")])
        if self.ckpt is None:
            self.ckpt = CheckpointManager(acc, self.out_dir, self.keep, self._meta, self._state,
                                          on_save=self.master.on_save, on_load=self.master.load)
        return prepared

    def _wrap_backward(self) -> None:
        """After the backward of a step that ends at a log tick: the gradient meters (device work, no read)."""
        acc, backward = self.accelerator, self.accelerator.backward

        def metered_backward(loss: Any, **kwargs: Any) -> Any:
            out = backward(loss, **kwargs)
            due = self.meters is not None and acc.sync_gradients and self._tick_next()
            scaled = acc.scaler is not None and acc.scaler.is_enabled()
            if due and scaled:  # the gradients as the backward left them: times the loss scale
                self.meters.after_backward([p for m in acc._models for p in m.parameters()])
            if self.meters is not None:
                self.meters.armed = due  # bf16-true's optimizer step measures its lost updates (amp/master.py)
            return out

        acc.backward = metered_backward

    def _tick_next(self) -> bool:
        """Whether the optimizer step being computed now ends at a log tick."""
        step = self.progress.step + 1
        return step % self.log_every == 0 or step == self.max_steps

    def _finish_audit(self) -> None:
        scaler = self.accelerator.scaler
        problems = self.audit.finish(scaler if scaler is not None and scaler.is_enabled() else None)
        for line in self.audit.lines():
            self.say(line)
        if problems and self.audit.mode == "strict":
            raise AuditError(f"precision audit: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                                  if len(problems) > 1 else ""))
        for line in problems:
            self.say(f"warning: precision audit: {line}", style="yellow")

    def _low_precision_weights(self, objects: tuple[Any, ...]) -> None:
        acc = self.accelerator
        engine = str(acc.distributed_type)
        if "FSDP" in engine or "DEEPSPEED" in engine or "MEGATRON" in engine:
            raise _precision.PrecisionError(
                f"precision {self.resolution.effective} runs on one process or under DDP; under {engine.split('.')[-1]} "
                "use bf16, whose engine keeps float32 master weights itself")
        optimizers = [o for o in (*objects, *acc._optimizers) if hasattr(o, "param_groups")]
        for model in (o for o in objects if isinstance(o, torch.nn.Module)):
            self.master.attach(model, optimizers)
        for opt in optimizers:
            self.master.take(opt)

    def track(self, obj: Any, name: str | None = None) -> Any:
        """Keep ``obj`` in every checkpoint and restore it on resume; returns ``obj``.

        ``obj``: anything with ``state_dict()``/``load_state_dict()``, or a dict (a resume updates it in place), e.g.
        ``state = amp.track({"best_val_loss": float("inf"), "lr": args.lr})``. ``name`` defaults to the order of
        the calls; call in the same order on every run, before or after :meth:`resume`.
        """
        if not isinstance(obj, dict) and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"amp.track() takes a dict or an object with state_dict()/load_state_dict(), "
                            f"got {type(obj).__name__}")
        name = name or f"tracked_{len(self._tracked)}"
        if name in self._tracked:
            raise ValueError(f"amp.track(): the name {name!r} is taken")
        self._tracked[name] = obj
        if name in self._tracked_state:
            self._restore_tracked(name, self._tracked_state.pop(name))
        return obj

    def _restore_tracked(self, name: str, state: Any) -> None:
        obj = self._tracked[name]
        if isinstance(obj, dict):
            obj.update(state)
        else:
            obj.load_state_dict(state)

    def _state(self) -> dict[str, Any]:
        """What this process saves of the session in every checkpoint (amp_state_<process>.pt)."""
        tracked = {n: dict(o) if isinstance(o, dict) else o.state_dict() for n, o in self._tracked.items()}
        return {"progress": self.progress.state_dict(), "monitor": self.monitor.state_dict(), "tracked": tracked}

    def find_checkpoint(self, policy: str = "auto") -> tuple[Path | None, list[str]]:
        """The checkpoint :meth:`resume` would load for ``policy`` (``auto``, ``none`` or a path), with notices."""
        return find_resume(self.out_dir, policy)

    def resume(self, policy: str | os.PathLike[str] = "auto", *, check: Any = None) -> list[str]:
        """Resume from ``policy``: ``"auto"`` (newest complete checkpoint in out_dir), ``"none"``, or a path.

        Restores model, optimizer, scheduler, scaler (across precisions), RNG, step, epoch, data position, AMP
        statistics and what :meth:`track` keeps. ``check(meta)`` may inspect the chosen checkpoint's meta.json first
        and return notices or raise to refuse. Prints and returns the notices. A fresh start moves an earlier run's
        files in out_dir aside.
        """
        if self.ckpt is None:
            raise RuntimeError("call AmpSession.prepare(...) before resume()")
        path, notices = find_resume(self.out_dir, str(policy))
        if path is not None and check is not None:
            notices += list(check(read_meta(path)) or [])
        if path is not None and Path(path).resolve().parent != (self.out_dir / CHECKPOINTS).resolve():
            # a checkpoint from elsewhere starts another line of runs here: the one in out_dir moves aside
            notices += self._move_aside(f"resume from {path}")
        if path is not None:
            loaded = self.ckpt.load(path, self.resolution.effective,
                                    self.scaler_kwargs if self.resolution.uses_scaler else None,
                                    rescale_schedulers=self.rescale_schedule)
            notices += loaded.notices + self._apply_state(loaded.state)
            self._last_saved = self.progress.step
            if self.is_main and (n := trim_log(self.out_dir / METRICS, self.progress.step)):
                notices.append(f"resume: dropped {n} {METRICS} records logged after step {self.progress.step}")
        else:
            notices += self._move_aside("fresh start")
        self.monitor.sync_scale()  # the scale in effect now, restored or fresh
        for line in notices:
            self.say(line)
        self.trackers.start(self.accelerator, read_meta(path) if path is not None else None, self.progress.step)
        self._clock = _Clock(step=self.progress.step, samples=self.progress.samples_seen,
                             tokens=self.progress.tokens_seen)
        return notices

    def _apply_state(self, state: dict[str, Any] | None) -> list[str]:
        if state is None:
            return ["resume: the checkpoint holds no training position: step, epoch and data start from 0"]
        if state.get("progress"):
            self.progress.load_state_dict(state["progress"])
        if state.get("monitor"):
            self.monitor.load_state_dict(state["monitor"])
        saved = dict(state.get("tracked") or {})
        notices = [f"resume: the checkpoint holds nothing for amp.track(..., name={n!r}); it keeps its value"
                   for n in self._tracked if n not in saved]
        for name in list(saved):
            if name in self._tracked:
                self._restore_tracked(name, saved.pop(name))
        self._tracked_state = saved  # for track() calls after resume()
        return notices

    def _move_aside(self, why: str) -> list[str]:
        notices = move_aside(self.out_dir, why) if self.is_main else []
        self.accelerator.wait_for_everyone()
        return notices

    # ------------------------------------------------------------------ data

    def epochs(self, start: int, stop: int | None = None) -> Iterator[int]:
        """The epochs left: ``amp.epochs(n)`` is ``range(n)`` and ``amp.epochs(1, n + 1)`` is ``range(1, n + 1)``,
        both from the resumed epoch on. Ends early once the run stopped (:attr:`should_stop`)."""
        first, end = (0, start) if stop is None else (start, stop)
        while self.stop is None and first + self.progress.epoch < end:
            index = self.progress.epoch
            yield first + index
            if self.stop is None and self.progress.epoch == index:  # the loop did not finish it through batches()
                self.progress.epoch, self.progress.batch_in_epoch = index + 1, 0

    def batches(self, source: Iterable[Any]) -> Iterator[Any]:
        """Yield one epoch of ``source`` from the saved position; at its end the epoch counter moves on.

        ``source``: a DataLoader (its sampler skips what a resumed run already trained on) or any iterable that gives
        the same batches in the same order on every run (a ``range`` of offsets, a list, a new generator each
        epoch). Ends early once the run stopped (:attr:`should_stop`).
        """
        p = self.progress
        if self.stop is not None:
            return
        for batch in EpochIterator(source, p, self.accelerator, self._last_iterator):
            p.batch_in_epoch += 1
            samples, tokens = count(batch)
            self._pending_counts[0] += samples
            self._pending_counts[1] += tokens
            if not self._fingerprinted:
                self._fingerprint = fingerprint(batch)
                self._fingerprinted = self._fingerprint is not None
            yield batch
            if self.stop is not None:
                return
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0

    # ------------------------------------------------------------------ each step

    def after_step(self, loss: Any = None, grad_norm: Any = None, *, samples: int | None = None,
                   tokens: int | None = None, **values: Any) -> bool:
        """Call after each ``optimizer.step()`` (every micro-batch under ``accelerator.accumulate``). Returns
        :attr:`should_stop`: True when the run stopped early (its state is saved): end the loop.

        ``loss``, ``grad_norm`` and your own ``values`` (tensors or numbers, e.g. ``acc=acc``) are kept on the device
        and read at log ticks; they appear on the console, in ``metrics.jsonl`` and the trackers (``train/NAME``).
        ``samples``/``tokens``: this process's counts for throughput when the batch layout does not say them.
        Counts an optimizer step when gradients synced; at log ticks runs :meth:`tick` and the guard; saves every
        ``checkpoint_every`` steps; honours a stop signal. A loop that calls it again after a stop ends the process
        (exit status 0 after a signal, 3 after the guard).
        """
        if self.stop is not None:
            raise self.stop.exception()
        acc = self.accelerator
        for name, value in (("loss", loss), *values.items()):
            if value is not None:
                value = value.detach() if isinstance(value, torch.Tensor) else float(value)
                self._micro[name] = value if name not in self._micro else self._micro[name] + value
        self._micro_n += 1
        if grad_norm is not None:
            self._grad_norm = grad_norm
        if not acc.sync_gradients:
            return False
        self.checks.after_step()  # fp16 mistakes that must stop at once: a LoopError naming the fix
        if self.audit.mode != "off" and self.audit.result is None:
            self._finish_audit()
        if not self._entered:
            self.console.__enter__()
            self._entered = True
        p = self.progress
        p.step += 1
        counted, self._pending_counts = self._pending_counts, [0, 0]
        p.samples_seen += (counted[0] if samples is None else samples) * acc.num_processes
        p.tokens_seen += (counted[1] if tokens is None else tokens) * acc.num_processes
        means = {k: v / self._micro_n for k, v in self._micro.items()}
        loss = means.pop("loss", None)
        if not self._fingerprinted and loss is not None:
            self._fingerprint = loss.float().clone() if isinstance(loss, torch.Tensor) else float(loss)
            self._fingerprinted = True
        self.monitor.record(p.step, loss, self._grad_norm, means)
        self._micro, self._micro_n, self._grad_norm = {}, 0, None

        tick = None
        if p.step % self.log_every == 0 or p.step == self.max_steps:
            tick = self.tick()
            self._apply(tick.decision)
        if self.stop is None:
            # one process: every step; several: at ticks only, where every rank takes part in the collective
            signalled = tick.stop if tick is not None else (acc.num_processes == 1 and self._signal.signame)
            if signalled:
                self._stop_for_signal()
            elif self.checkpoint_every and p.step % self.checkpoint_every == 0:
                self.save()
        return self.stop is not None

    def poll_stop(self) -> bool:
        """Between optimizer steps (a long evaluation): True when a stop signal arrived, after saving the state
        as :meth:`after_step` would. With several processes this is a collective: call it on every process at the
        same points (e.g. each eval batch)."""
        if self.stop is not None:
            return True
        if any_rank(self.accelerator, self._signal.signame is not None):
            self._stop_for_signal()
        return self.stop is not None

    def _stop_for_signal(self) -> None:
        path = self.save(quiet=True)
        name = self._signal.signame or "a stop signal on another process"
        self.stop = Stop("signal", self.step, str(path), signame=name)
        self.say(f"stopped by {name} at step {self.step}; state saved to {path}")

    def tick(self) -> Tick:
        """Read the interval's values (one sync), agree across processes (one collective), log, show, judge."""
        acc = self.accelerator
        m = self.monitor.flush()
        lr = self._lr()
        if lr is not None:
            m["train/lr"] = lr
        problem = self.monitor.check(self.policy.min_scale, self.policy.max_consecutive_skips)
        stop = self._signal.signame is not None
        warnings = self.checks.at_tick()
        if acc.num_processes > 1:
            loss = m.get("train/loss")
            vec = torch.tensor([0.0 if loss is None else loss, float(loss is not None), float(problem is not None),
                                float(stop), 0.0], device=acc.device)
            if self._fingerprint is not None:
                vec[4] = self._fingerprint if isinstance(self._fingerprint, torch.Tensor) else float(self._fingerprint)
            rows = acc.gather(vec).reshape(acc.num_processes, -1).tolist()  # the tick's one collective
            if any(r[1] for r in rows):
                m["train/loss"] = sum(r[0] for r in rows) / sum(r[1] for r in rows)
            if problem is None and any(r[2] for r in rows):
                problem = Problem("other_rank", "another process tripped the AMP guard")
            stop = any(r[3] for r in rows)
            if self._fingerprint is not None:
                warnings += [w for w in [self.checks.same_data_warning([r[4] for r in rows], len(rows))] if w]
        for line in warnings:
            self.say(line, style="yellow")
        meters = self.meters.read() if self.meters is not None else {}
        m.update(meters)
        self._meter_stats.update(meters)
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
            self.stop = Stop("guard", self.step, path, decision=decision, precision=self.resolution.effective)
            then = f"; continue in {decision.to} from it" if decision.action == "fallback" else ""
            self.say(f"stopped by the AMP guard at step {self.step}; state saved to {path}{then}")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` (``split/name`` keys) at ``step`` (default: now) through ``accelerator.log``: every
        tracker and out_dir/metrics.jsonl."""
        self.trackers.start(self.accelerator)
        self.accelerator.log(metrics, step=self.step if step is None else step)

    def _lr(self) -> float | None:
        if self._scheduler is not None:
            return float(self._scheduler.get_last_lr()[0])
        if self._optimizer is not None:
            return float(self._optimizer.param_groups[0]["lr"])
        return None

    def _perf(self) -> dict[str, float]:
        """Wall time per optimizer step and throughput over all processes since the last tick (samples and tokens
        only when counted: a batch that is an offset counts nothing)."""
        c, p = self._clock, self.progress
        now = time.perf_counter()
        steps = p.step - c.step
        out = {"perf/elapsed_s": now - c.start}
        if steps > 0:
            dt = max(now - c.last, 1e-9)
            out["perf/step_time_s"] = dt / steps
            if p.samples_seen > c.samples:
                out["perf/samples_per_s"] = (p.samples_seen - c.samples) / dt
            if p.tokens_seen > c.tokens:
                out["perf/tokens_per_s"] = (p.tokens_seen - c.tokens) / dt
        c.last, c.step, c.samples, c.tokens = now, p.step, p.samples_seen, p.tokens_seen
        return out

    def _status(self, m: dict[str, float]) -> Status:
        mon, step_time = self.monitor, m.get("perf/step_time_s")
        eta = (self.max_steps - self.step) * step_time if self.max_steps and step_time is not None else None
        own = {name: m[key] for name in mon.value_names if (key := value_key(name)) in m}
        return Status(
            step=self.step, total_steps=self.max_steps or 0, epoch=self.epoch, precision=self.resolution.effective,
            loss=m.get("train/loss"), lr=m.get("train/lr"), scale=mon.scale, scale_trend=list(mon.trend),
            skipped=mon.skipped, skip_rate=m["amp/skip_rate"], recent_skip_rate=mon.recent_skip_rate,
            consecutive_skips=mon.consecutive_skips, grad_norm=mon.last_grad_norm,
            samples_per_s=m.get("perf/samples_per_s"), tokens_per_s=m.get("perf/tokens_per_s"), eta_s=eta,
            peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if self.accelerator.device.type == "cuda" else None,
            world_size=self.accelerator.num_processes, values=own,
            meters={k: v for k, v in m.items() if k in METERS},
        )

    def _bf16_native(self) -> bool:
        if self._native_bf16 is None:
            self._native_bf16 = _precision.native_bf16(self.accelerator.device)
        return self._native_bf16

    # ------------------------------------------------------------------ checkpoints, the model, the end

    def _meta(self) -> dict[str, Any]:
        res = self.resolution
        return {"step": self.progress.step, "epoch": self.progress.epoch, "template_version": __version__,
                "precision": {"requested": res.requested, "effective": res.effective, "reason": res.reason},
                "scaler_kwargs": self.scaler_kwargs if res.uses_scaler else None,
                "precision_switches": self.monitor.switches, "torch": torch.__version__,
                "accelerate": _version("accelerate"), "config": self.config,
                "trackers": run_ids(self.accelerator), "audit": self.audit.result}

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

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Your model as a plain ``nn.Module``, for ``torch.save(model, f)`` as before and for evaluation in fp32.

        No DDP or compile wrapper and no autocast forward (Accelerate replaces ``model.forward`` on the prepared
        model, which a whole-module pickle cannot store); it shares the prepared model's parameters and buffers, and
        the prepared model keeps training as it was.
        """
        return _plain_module(self.accelerator.unwrap_model(model, keep_fp32_wrapper=True, keep_torch_compile=False))

    def locate(self, model: torch.nn.Module) -> Any:
        """Hooks that find the first module whose value passes this precision's limit (fp16: 65504) in the steps run
        inside ``with amp.locate(model) as loc:``: its forward outputs, the gradients its backward produced, its
        parameters' gradients (times the loss scale, as the backward computes them). ``loc.next_step(n)`` before
        step n, ``loc.finding()`` after it; ``loc.report()`` names the module and phase and prints the headroom table
        and how to keep the module in float32. Off the hot path: replay the steps from the checkpoint before the first
        skipped step (a resume is exact), not every step of a run. See amp/locate.py."""
        from .locate import OverflowLocator, limit_for

        scaler = self.accelerator.scaler
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        return OverflowLocator(model, limit_for(self.resolution.effective), scale)

    def full_precision(self, model: torch.nn.Module) -> torch.nn.Module:
        """Your model in float32 for evaluation with autocast off (``eval.precision=fp32``): :meth:`unwrap`'s module,
        or under bf16-true a float32 copy holding the master weights (made anew at each call)."""
        plain = self.unwrap(model)
        return self.master.float_copy(plain) if self.master else plain

    def summary(self) -> dict[str, Any]:
        """The run's AMP statistics (what :meth:`close` writes to out_dir/amp_summary.json)."""
        acc = self.accelerator
        out = {"precision": self.resolution.effective, **self.monitor.summary(),
               **self._meter_stats,  # the meters as of the last log tick
               "precision_switches": self.monitor.switches}
        if acc.num_processes > 1:  # the scaler sees all-reduced gradients: every rank skips the same steps
            skipped = acc.gather(torch.tensor([self.monitor.skipped], device=acc.device))
            out["amp/skipped_steps_per_rank"] = skipped.tolist()
        return out

    def close(self, completed: bool = True) -> None:
        """End the run: the final checkpoint and AMP summary (when ``completed`` and not stopped early), then restore
        the signal handlers, leave the console, release the lock and ``end_training()``. Safe to call twice.

        After a stop signal it says how to resume; after the collapse guard it ends the process with exit status 3
        (:class:`GuardStop`, or :class:`GuardFallback` naming the precision to continue in) once all is released.
        """
        if self._closed:
            return
        self._closed = True
        stop = self.stop
        try:
            if stop is None and completed and self.ckpt is not None:
                if self.step > 0 and self._last_saved != self.step:
                    self.save()
                summary = self.summary()
                self._leave_console()  # the final panel first, the summary below it
                if self.is_main:
                    (self.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
                    self.console.print_table(summary_table(summary))
                self.accelerator.wait_for_everyone()
            elif stop is not None and stop.reason == "signal":
                self.say(f"to resume: run the same command again (it continues from {stop.path})")
        finally:
            # an error on its way out of a run of several processes (a dead peer): the launcher soon sends the
            # survivors SIGTERM, which must find the session's handler, not kill the rank before it says why
            failing = self.accelerator.num_processes > 1 and sys.exc_info()[0] is not None
            if not failing:
                self._signal.restore()
            self._leave_console()
            self._rundir.release()
            self.accelerator.end_training()
            if self.accelerator.num_processes > 1 and not failing:
                _settle()  # gloo's workers drop their finished collectives before the interpreter ends
        if stop is not None and stop.reason == "guard" and completed:
            raise stop.exception()

    def _leave_console(self) -> None:
        if self._entered:
            self._entered = False
            self.console.__exit__(None, None, None)

    def __enter__(self) -> AmpSession:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        # an exception ends the run without a final save or summary (and without replacing that exception)
        self.close(completed=kind is None)


def _settle(seconds: float = 0.2) -> None:
    """After ``end_training()`` with several processes: DDP keeps gloo's worker threads alive, and one that releases
    a finished collective's Python tensor once the interpreter has begun to finalize aborts the process (SIGABRT,
    "terminate called without an active exception") although the run succeeded. A collection and a short pause
    let them release it first: ``benchmarks/exit_probe.py`` measured 0 aborts in 65 tries with it, 2 in 25 without.
    :func:`distributed.run_main` (``os._exit``) remains the certain end for scripts that opt in."""
    import gc

    gc.collect()
    time.sleep(seconds)


def _auto_by_measurement(rule: _precision.Resolution, state: Any, probe: Any) -> _precision.Resolution:
    """``auto`` timed on the caller's model where the hardware rule is not certain (amp/autopick.py); the main
    process measures or reads the cache, and every rank runs what it found."""
    share = None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        def share(value: Any) -> Any:
            box = [value]
            broadcast_object_list(box, from_process=0)
            return box[0]

    return _autopick.pick(rule, state.device, probe, state.is_main_process, share)


def _plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` and its children that shares their parameters and buffers, without the forward methods
    set on instances (Accelerate's autocast wrapper, fp32 regions): it pickles as the model class alone."""
    clone = copy.copy(module)
    for key in ("forward", "_original_forward", "_amp_fp32"):
        clone.__dict__.pop(key, None)
    clone._modules = {name: None if child is None else _plain_module(child) for name, child in module._modules.items()}
    return clone


__all__ = ["AmpSession", "LoopError", "OutputDirError", "RunLockedError", "Stop", "StopTraining", "Tick",
           "GuardStop", "GuardFallback", "has_accelerator"]
