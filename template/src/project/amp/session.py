"""One AMP session around one Accelerator: precision, the run's lock, data position, checkpoints, trackers, console
and the log tick's one collective; its features (``hooks.py``) do the rest (``amp/__init__.py`` states the contract)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import accelerate
import torch

from . import __version__, precision
from .checkpoint import CheckpointManager
from .console import Trackers, TrainConsole, run_ids, status, summary_table
from .distributed import any_rank, gather_rows
from .hooks import Hooks, plain_module
from .monitor import AmpMonitor, Clock, Problem, Stop, decide
from .position import LoopError, Progress, Tracked, epoch
from .rundir import RunDir, StopSignal, shield_workers
from .settings import AmpSettings, SettingsError

METRICS, SUMMARY = "metrics.jsonl", "amp_summary.json"


class AmpSession:
    """One Accelerator's AMP lifecycle: keywords named like AmpSettings fields set them, the rest go to Accelerator."""

    def __init__(self, settings: AmpSettings | str | None = None, out_dir: str | os.PathLike[str] = "runs/amp", *,
                 max_steps: int | None = None, config: dict[str, Any] | None = None, probe: Any = None,
                 **accelerator_kwargs: Any):
        kw = accelerator_kwargs
        base = settings if isinstance(settings, AmpSettings) else AmpSettings(settings or precision.launcher_choice())
        settings = dataclasses.replace(base, **{f.name: kw.pop(f.name) for f in dataclasses.fields(base) if f.name in kw})
        self.out_dir, self.max_steps, self.config = Path(out_dir), max_steps, config
        kw.setdefault("project_dir", str(self.out_dir))
        self.trackers = Trackers(self.out_dir / METRICS, settings, kw.pop("log_with", None), config)
        acc, self.resolution, self.settings = precision.accelerator_for(settings, probe, log_with=self.trackers.log_with,
                                                                        **kw)
        self.accelerator = acc
        self.console = TrainConsole(max_steps, live=settings.live, enabled=acc.is_main_process)
        self.hooks = Hooks(acc, self.settings, self.resolution, self.console.log,
                           scaler=precision.cpu_fp16_scaler(acc, self.settings.scaler_kwargs))
        # whether the optimizer step being computed now ends at a log tick
        self.hooks.tick_due = lambda: (self.step + 1) % self.settings.log_every == 0 or self.step + 1 == self.max_steps
        self.monitor, self.progress, self.tracked, self.clock = AmpMonitor(acc.scaler), Progress(), Tracked(), Clock()
        self.hooks.tracked = self.tracked
        self.ckpt: CheckpointManager | None = None
        self.stop: Stop | None = None
        self.scale: float | None = None  # as of the last log tick
        self._closed, self._warned, self._last_saved, self._last_iter = False, None, None, []  # _last_iter: batches'
        self._rundir = RunDir(self.out_dir)
        self._rundir.acquire(acc)  # one run per out_dir; then the stop signals are the run's
        self._signal = StopSignal()
        self.console.log(self.resolution.line())
        self.console.log(f"world_size={acc.num_processes} distributed_type={acc.distributed_type.value} "
                         f"device={acc.device} scaler={type(acc.scaler).__name__ if acc.scaler else 'none'}")

    step = property(lambda self: self.progress.step, doc="Optimizer steps done (restored on resume).")
    epoch = property(lambda self: self.progress.epoch, doc="The epoch in progress, from 0 (restored on resume).")

    def prepare(self, *objects: Any) -> Any:
        """``accelerator.prepare(...)``, the settings' ``fp32_modules`` kept in float32 first; returns its result."""
        acc = self.accelerator
        models = [o for o in objects if isinstance(o, torch.nn.Module)]
        for model in models if self.settings.fp32_modules else ():
            names = precision.keep_in_fp32(model, self.settings.fp32_modules)
            self.console.log(f"fp32 modules: {', '.join(names)}")
            if self.resolution.effective != "fp32" and precision.covers_all(model, names):
                said = ("fp32_modules keep every module in float32: the precision in effect is fp32, not "
                        f"{self.resolution.effective}")
                if self.settings.audit == "strict":
                    raise SettingsError(said)
                self.console.log(f"warning: {said}", style="yellow")
        optimizers = {id(o): o for o in (getattr(o, "optimizer", o) for o in (*objects, *acc._optimizers)
                                         if hasattr(o, "param_groups"))}
        self.hooks.before_prepare(models, list(optimizers.values()))
        prepared = acc.prepare(*objects)
        items = prepared if isinstance(prepared, tuple) else (prepared,)
        for item in items:
            shield_workers(item)
        # DeepSpeed fp16 owns its loss scale; the engine is known only now
        self.monitor.scale_fn = precision.engine_loss_scale(acc, next((o for o in items if hasattr(o, "forward")), None))
        self.hooks.watch_optimizers()
        self.hooks.call("after_prepare", [o for o in items if isinstance(o, torch.nn.Module)],
                        [o for o in items if hasattr(o, "param_groups")])
        self.ckpt = self.ckpt or CheckpointManager(self.hooks, self.out_dir, self.settings.keep, self._meta, self._state)
        return prepared

    def track(self, obj: Any, name: str | None = None) -> Any:
        """Keep ``obj`` (a dict, or with ``state_dict``) in every checkpoint; ``name``: by call order by default."""
        return self.tracked.add(obj, name)

    def resume(self, policy: str | os.PathLike[str] = "auto", *, check: Any = None,
               rescale_schedule: bool = False) -> list[str]:
        """Resume from ``policy`` (``auto``, ``none`` or a path) or start fresh; ``check(meta)`` may refuse; notices."""
        if self.ckpt is None:
            raise RuntimeError("call AmpSession.prepare(...) before resume()")
        res = self.resolution
        path, meta, notices, state = self.ckpt.resume(
            str(policy), res.effective, self.settings.scaler_kwargs if res.uses_scaler else None, check,
            rescale_schedule, self.out_dir / METRICS, () if self.accelerator.trackers else (self.trackers.run_name,))
        if path is not None and state is None:
            notices.append("resume: the checkpoint holds no training position: step, epoch and data start from 0")
        state = state or {}
        if path is not None:
            self.progress.load_state_dict(state.get("progress") or {})
            self.monitor.load_state_dict(state.get("monitor") or {})
            for f in self.hooks.features:
                f.load_state_dict((state.get("features") or {}).get(f.name) or {})
            notices += self.tracked.load_state_dict(state.get("tracked") or {})
            notices += self.monitor.switched(meta, path, res.effective)
            self._last_saved = self.step
        self.monitor.sync_scale()  # the scale in effect now, restored or fresh
        self.scale = self.monitor.scale
        if self._done():
            notices.append(f"nothing to do: resumed at step {self.step}, the step budget (max_steps) is "
                           f"{self.max_steps}")
        for line in notices:
            self.console.log(line)
        self.trackers.start(self.accelerator, meta, self.step)
        self.clock = Clock(step=self.step, samples=self.progress.samples_seen, tokens=self.progress.tokens_seen)
        return notices

    def _done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _end_if_stopped(self) -> None:
        """A loop that goes on after a stop (its state saved) is ended here with the stop's exit status."""
        if self.stop is not None:
            self.close()
            sys.exit(self.stop.exit_code)

    def epochs(self, start: int, stop: int | None = None) -> Iterator[int]:
        """``range(start, stop)`` (or ``range(start)``) from the resumed epoch on; none once the step budget is used."""
        first, end = (0, start) if stop is None else (start, stop)
        while first + self.epoch < end and not self._done():
            self._end_if_stopped()
            index = self.epoch
            yield first + index
            self._end_if_stopped()
            if self.epoch == index:  # the loop did not finish it through batches()
                self.progress.epoch, self.progress.batch_in_epoch = index + 1, 0

    def batches(self, source: Iterable[Any]) -> Iterator[Any]:
        """One epoch of ``source`` (the same batches in the same order on every run) from the saved position."""
        self._end_if_stopped()
        p, n, fresh = self.progress, 0, self.progress.batch_in_epoch == 0
        for batch in epoch(source, p, self.accelerator, self._last_iter) if not self._done() else ():
            n += 1
            p.count(batch)
            self.hooks.call("on_batch", batch)
            yield batch
            if self.stop is not None or self._done():  # the epoch's loop ends as at an epoch's end; a next call ends
                return  # the process (the loop's own per-epoch code, e.g. its `if amp.stop: break`, runs first)
        if fresh and not n and not self._done():
            raise LoopError("amp.batches(): an epoch of the data gave no batch (an empty loader: check the batch "
                            "size, drop_last and the number of processes)")
        if not self._done():
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0

    def after_step(self, loss: Any = None, grad_norm: Any = None, *, samples: int | None = None,
                   tokens: int | None = None, **values: Any) -> bool:
        """After each ``optimizer.step()`` (each micro-batch under ``accumulate``); True once the run stopped, its
        state saved. The values stay on the device until a log tick; ``samples``/``tokens``: where batches lack them."""
        self._end_if_stopped()
        if self.ckpt is None:
            raise LoopError("call amp.prepare(model, optimizer, ...) before the first amp.after_step")
        acc, p = self.accelerator, self.progress
        self.monitor.add(loss, grad_norm, values)
        p.count(samples=samples, tokens=tokens)
        if not acc.sync_gradients:
            return False
        self.hooks.watch_optimizers()
        self.hooks.call("at_step", loss)  # the loop's mistakes that must stop at once, the audit
        self.console.__enter__()  # the live panel, from the first step on (once)
        p.advance(acc.num_processes)
        self.monitor.end_step(p.step)
        signalled = acc.num_processes == 1 and self._signal.signame is not None  # several: agreed at ticks only
        if p.step % self.settings.log_every == 0 or p.step == self.max_steps:
            signalled = self._tick()
        if self.stop is None and signalled:
            self._stop("signal", self._signal.signame or "a stop signal on another process")
        elif self.stop is None and self.settings.checkpoint_every and p.step % self.settings.checkpoint_every == 0:
            self._save()
        return self.stop is not None

    def poll_stop(self, activity: str | None = None) -> bool:
        """Between steps (an eval): show ``activity``; True once a stop signal arrived, state saved (a collective)."""
        self.console.activity(activity)
        if self.stop is None and any_rank(self.accelerator, self._signal.signame is not None):
            self._stop("signal", self._signal.signame or "a stop signal on another process")
        return self.stop is not None

    def _tick(self) -> bool:
        """Read the interval (one sync), agree across processes (one collective), log, judge; True on a stop signal."""
        acc, g = self.accelerator, self.settings.guard
        m, problem = self.monitor.tick(acc, g)
        shared, loss = self.hooks.shared(), m.get("train/loss")
        rows = gather_rows(acc, [0.0 if loss is None else loss, float(loss is not None), float(problem is not None),
                                 float(self._signal.signame is not None), *(v for vs in shared for v in vs)])
        if any(r[1] for r in rows):  # the mean over the processes that have a loss
            m["train/loss"] = sum(r[0] for r in rows) / sum(r[1] for r in rows)
        if problem is None and any(r[2] for r in rows):
            problem = Problem("other_rank", "another process tripped the AMP guard")
        m.update(self.hooks.at_tick(shared, rows, 4))
        m.update(self.clock.read(self.step, self.progress.samples_seen, self.progress.tokens_seen))
        decision = decide(g, problem, precision=self.resolution.effective,
                          native_bf16=precision.native_bf16(acc.device), warned=self._warned)
        self._warned = None if problem is None else (problem.kind if decision.action in ("warn", "ok") else None)
        self.trackers.start(acc)
        acc.log(m, step=self.step)
        self.scale = self.monitor.scale
        self.console.update(status(m, self.monitor, self.progress, self.max_steps, self.resolution.effective,
                                   acc.num_processes, acc.device))
        if decision.action == "warn":
            self.console.log(f"warning: {problem.message} (the AMP guard only warns)", style="yellow")
        elif decision.action in ("stop", "fallback"):
            self.console.log(self.monitor.diagnosis(problem, self.resolution.effective), style="red")
            self._stop("guard", problem.message, decision.to)
        return any(r[3] for r in rows)

    def _stop(self, reason: str, message: str, to: str | None = None) -> None:
        self.stop = Stop(reason, self.step, "", message, to)  # in meta.json of the checkpoint saved now
        path = str(self._save(quiet=True))
        self.stop = dataclasses.replace(self.stop, path=path)
        who = f"by {message}" if reason == "signal" else "by the AMP guard"
        then = f"; it asks to continue in {to} from there" if to else " (amp.resume continues from it)"
        self.console.log(f"stopped {who} at step {self.step}; state saved to {path}{then}")

    def _meta(self) -> dict[str, Any]:
        res = self.resolution
        meta = {"step": self.step, "epoch": self.epoch, "template_version": __version__,
                "precision": {"requested": res.requested, "effective": res.effective, "reason": res.reason},
                "scaler_kwargs": self.settings.scaler_kwargs if res.uses_scaler else None, "torch": torch.__version__,
                "accelerate": accelerate.__version__, "config": self.config, "trackers": run_ids(self.accelerator),
                **self.monitor.meta(self.stop, res.effective)}
        for part in self.hooks.call("meta"):
            meta.update(part)
        return meta

    def _state(self) -> dict[str, Any]:
        """What this process saves of the session in every checkpoint (amp_state_<process>.pt)."""
        return {"progress": self.progress.state_dict(), "monitor": self.monitor.state_dict(),
                "tracked": self.tracked.state_dict(), "features": {f.name: f.state_dict() for f in self.hooks.features}}

    def _save(self, quiet: bool = False) -> Path:
        """Save everything a resume needs as ``out_dir/checkpoints/step_NNNNNNN`` (on every process)."""
        path = self.ckpt.root / f"step_{self.step:07d}"
        if self._last_saved != self.step or not path.is_dir():
            path, self._last_saved = self.ckpt.save(self.step), self.step
            if not quiet:
                self.console.log(f"checkpoint: {path}")
        return path

    def unwrap(self, model: torch.nn.Module, full_precision: bool = False) -> torch.nn.Module:
        """Your model as a plain module sharing the prepared one's tensors; ``full_precision``: a float32 copy."""
        plain = plain_module(self.accelerator.unwrap_model(model, keep_fp32_wrapper=True, keep_torch_compile=False))
        master = self.hooks.get("master")
        return master.float_copy(plain) if full_precision and master is not None else plain

    def summary(self) -> dict[str, Any]:
        """The run's AMP statistics (what :meth:`close` writes to out_dir/amp_summary.json)."""
        acc, p = self.accelerator, self.progress
        out = {"precision": self.resolution.effective, **self.monitor.summary(), "samples_seen": p.samples_seen,
               "tokens_seen": p.tokens_seen}
        for part in self.hooks.call("summary"):
            out.update(part)
        out["precision_switches"] = self.monitor.switches
        if acc.num_processes > 1:  # the scaler sees all-reduced gradients: every rank skips the same steps
            out["amp/skipped_steps_per_rank"] = acc.gather(torch.tensor([self.monitor.skipped], device=acc.device)
                                                           ).tolist()
        return out

    def close(self, completed: bool = True) -> int:
        """End the run: the final checkpoint and summary if ``completed``; safe twice. Returns the exit status."""
        if not self._closed:
            self._closed = True
            try:
                if self.stop is None and completed and self.ckpt is not None:
                    if self.step > 0:
                        self._save()
                    summary = self.summary()
                    self.console.__exit__(None, None, None)  # the final panel first, the summary below it
                    if self.accelerator.is_main_process:
                        (self.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
                        self.console.print_table(summary_table(summary))
                    self.accelerator.wait_for_everyone()
            finally:
                # a dead peer: the launcher's SIGTERM must find our handler, not kill a rank before it says why
                several = self.accelerator.num_processes > 1
                failing = several and sys.exc_info()[0] is not None
                if not failing:
                    self._signal.restore()
                self.console.__exit__(None, None, None)
                self._rundir.release()
                self.accelerator.end_training()
                if several and not failing:
                    gc.collect()  # gloo's workers drop their finished collectives before the interpreter ends
                    time.sleep(0.2)
        return self.stop.exit_code if self.stop else 0

    def __enter__(self) -> AmpSession:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self.close(completed=kind is None)  # an exception: no final save or summary, and the exception stays
