"""Checkpoints around ``accelerator.save_state``/``load_state``: atomic, rotated, resumable across precisions.

Layout (a superset of what Accelerate writes, so a plain ``accelerator.load_state(path)`` still loads it)::

    out_dir/checkpoints/
      step_0000200/   model.safetensors optimizer.bin scheduler.bin scaler.pt random_states_*.pkl
                      custom_checkpoint_*.pkl (registered objects: training progress, AMP monitor)
                      meta.json (precision, scaler kwargs, resolved config, world size, versions)
      latest          the name of the newest complete checkpoint, written last

A checkpoint is complete or invisible: it is written into ``.tmp-step_*`` and renamed into place, and
``latest`` moves after that. Resuming under another precision never crashes: the scaler is handled here
(Accelerate raises on a missing or empty scaler.pt, drops the scale silently, and lets scaler.pt replace
the run's GradScalerKwargs), and every decision is returned as a one-line notice.

    ckpt = CheckpointManager(accelerator, out_dir, keep=3, meta=lambda: {...})
    path, notices = find_resume(out_dir, "auto")
    if path: notices += ckpt.load(path, precision="fp16", scaler_kwargs={...})
    ...
    ckpt.save(step)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
SCALER = "scaler.pt"
NAME_RE = re.compile(r"^step_(\d{7,})$")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0", "pytorch_model")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount): one line naming the path and the cause."""


@dataclass
class Progress:
    """Where the run is: registered for checkpointing so the data position survives a resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch (per process)
    samples_seen: int = 0  # over all processes
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, int(v))


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _step_of(path: Path) -> int | None:
    m = NAME_RE.match(path.name)
    return int(m.group(1)) if m else None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {META} ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {META} does not hold a JSON object")
    return meta


# Parts whose loss costs only bit-exactness (Accelerate skips an unreadable RNG state silently): a notice, not a refusal
SOFT_PARTS = re.compile(r"^random_states_\d+\.pkl$")


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _bad_part(path: Path, name: str, want: Any) -> str | None:
    """Why the recorded part ``name`` does not verify, or None when it does."""
    part = path / name
    if not part.is_file():
        return "missing"
    if isinstance(want, dict):  # size and sha256 recorded at save (older checkpoints list names only)
        if part.stat().st_size != want.get("size"):
            return f"{part.stat().st_size} bytes, {want.get('size')} when saved"
        if "sha256" in want and _digest(part)["sha256"] != want["sha256"]:
            return "content differs from what was saved"
    return None


_VERIFIED: dict[str, tuple[Any, list[str]]] = {}  # path -> (stat of its files, notices): hashed once while unchanged


def check_complete(path: Path) -> list[str]:
    """Raise CheckpointError unless ``path`` is a complete checkpoint whose parts verify against meta.json.

    Returns notices for parts that only cost bit-exactness (an RNG state that does not verify).
    """
    path = Path(path)
    try:
        stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
    except OSError:
        stamp = None
    if stamp is not None and _VERIFIED.get(str(path), (None,))[0] == stamp:
        return list(_VERIFIED[str(path)][1])
    notices = _verify(path)
    _VERIFIED[str(path)] = (stamp, notices)
    return list(notices)


def _verify(path: Path) -> list[str]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    meta = read_meta(path)
    if not meta.get("complete"):
        raise CheckpointError(f"{path}: {META} does not mark it complete")
    if not any((path / f).exists() for f in MODEL_FILES):
        raise CheckpointError(f"{path}: no model weights ({' or '.join(MODEL_FILES[:2])})")
    files = meta.get("files", [])
    recorded = files if isinstance(files, dict) else dict.fromkeys(files)
    notices = []
    for name, want in sorted(recorded.items()):
        why = _bad_part(path, name, want)
        if why is None:
            continue
        if SOFT_PARTS.match(name):
            notices.append(f"resume: {path / name} is unreadable ({why}): the resume is not bit-exact "
                           "(that process's RNG state is lost)")
        else:
            raise CheckpointError(f"{path / name}: {why}")
    return notices


UNREADABLE = 2**62  # the save sequence given to a checkpoint whose meta.json cannot be read


def _order(path: Path) -> tuple[int, int]:
    """(save sequence, step): the run's own history, so a checkpoint saved later sorts later whatever its step.

    Checkpoints from before the sequence existed have 0 (then the step decides); one whose meta.json is unreadable
    sorts newest, so that ``resume=auto`` looks at it first and says why it skips it.
    """
    try:
        meta = json.loads((path / META).read_text())
        seq = int(meta.get("seq", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        seq = UNREADABLE
    return seq, _step_of(path) or 0


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories under ``out_dir/checkpoints``, oldest first by when they were saved (complete or not)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_order)


def find_resume(out_dir: str | Path, resume: str) -> tuple[Path | None, list[str]]:
    """Pick the checkpoint to resume from: ``none``, ``auto`` (newest complete one) or a path.

    Returns (path or None, notices). A ``resume=PATH`` that is missing, incomplete or corrupt raises CheckpointError;
    under ``auto`` such a checkpoint is skipped with a notice naming the bad part.
    """
    notices: list[str] = []
    if resume == "none":
        if list_checkpoints(out_dir):
            notices.append(f"resume: starting fresh as asked, although {Path(out_dir) / CHECKPOINTS} holds checkpoints")
        return None, notices
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"resume: no such checkpoint: {path}")
        return path, check_complete(path)
    # newest complete wins; `latest` can lag by one save if a crash came between the rename and its update
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, notices + check_complete(path)
        except CheckpointError as e:
            notices.append(f"resume: skipping incomplete checkpoint ({e})")
    return None, notices


def trim_log(path: str | Path, step: int) -> int:
    """Drop JSON-lines records past ``step`` (logged after the checkpoint a run resumes from); returns how many.

    A run killed after its last checkpoint logged steps that the resumed run will log again. A line that is not
    a JSON object (half written when the process was killed) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines(keepends=True)

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step

    kept = [ln for ln in lines if ln.strip() and keep(ln)]
    if len(kept) != len(lines):
        _atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


class StopSignal:
    """SIGTERM/SIGINT/SIGHUP (what schedulers send before preemption, a closed terminal) ask for a save-and-exit
    at the next step.

    A second Ctrl-C stops at once. :meth:`restore` puts the previous handlers back (the session does it when the
    run ends, so a Ctrl-C after an in-process run is not swallowed).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}
        for sig in signals:
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGHUP under nohup: leave it ignored
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                break

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    def restore(self) -> None:
        """Reinstall the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


# ----------------------------------------------------------------------------
# Saving


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished folder ``src`` to ``dest`` by renames; an existing ``dest`` goes only once ``src`` is there."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.with_name(f".old-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _scaler_hidden(accelerator: Any, hide: bool) -> Iterator[None]:
    """Hide the accelerator's scaler from save_state/load_state for a moment."""
    scaler = accelerator.scaler
    if hide:
        accelerator.scaler = None
    try:
        yield
    finally:
        accelerator.scaler = scaler


class CheckpointManager:
    """Saves and loads checkpoints for one accelerator; see the module docstring for the layout."""

    def __init__(self, accelerator: Any, out_dir: str | Path, keep: int, meta: Callable[[], dict[str, Any]]):
        self.accelerator = accelerator
        self.root = Path(out_dir) / CHECKPOINTS
        self.keep = keep
        self.meta = meta
        self._hook = accelerator.register_save_state_pre_hook(self._write_meta)

    def _write_meta(self, models: Any, weights: Any, output_dir: str) -> None:
        # runs inside save_state on every rank; only the main process writes the shared file
        if not self.accelerator.is_main_process:
            return
        meta = dict(self.meta())
        meta.update(complete=False, world_size=self.accelerator.num_processes)
        _atomic_write(Path(output_dir) / META, json.dumps(meta, indent=2, default=str))

    def save(self, step: int) -> Path:
        """Save the full training state as ``step_NNNNNNN``; every rank must call this."""
        acc = self.accelerator
        final = self.root / checkpoint_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        # Accelerate writes scaler.pt from every rank to the same path; let only the main process write it
        try:
            with _scaler_hidden(acc, hide=not acc.is_main_process):
                acc.save_state(str(tmp))
        except Exception as e:  # OSError, or safetensors' own error type for the same faults (a full disk)
            shutil.rmtree(tmp, ignore_errors=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointWriteError(f"{tmp}: cannot write the checkpoint ({first})") from e
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = json.loads((tmp / META).read_text())
            # size and hash of every part, checked on resume: a truncated or damaged file is found before loading
            meta["files"] = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != META}
            meta["seq"] = 1 + max((o for p in list_checkpoints(self.root.parent) if (o := _order(p)[0]) != UNREADABLE),
                                  default=0)
            meta["complete"] = True
            _atomic_write(tmp / META, json.dumps(meta, indent=2, default=str))
            _fsync_dir(tmp)
            replace_dir(tmp, final)  # the same step again replaces it (e.g. stop right after a periodic save)
            _fsync_dir(self.root)
            _atomic_write(self.root / LATEST, final.name + "\n")
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        # oldest first by save order: a run resumed from an older checkpoint keeps its own new saves; a checkpoint
        # whose meta.json cannot be read is not this run's to delete
        ckpts = [p for p in list_checkpoints(self.root.parent) if _order(p)[0] != UNREADABLE]
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def load(self, path: str | Path, precision: str, scaler_kwargs: dict[str, Any] | None,
             rescale_schedulers: bool = False) -> list[str]:
        """Load a checkpoint into the prepared objects; returns one-line notices for the console.

        The scaler is handled here, for all nine pairs of fp32/bf16/fp16: scale and growth tracker come
        from the checkpoint when both runs are fp16, while the current run's scaler knobs win.
        ``rescale_schedulers``: for schedules written in optimizer steps (a prepared scheduler steps once per
        process per optimizer step), move their position when the number of processes changed.
        """
        acc = self.accelerator
        path = Path(path)
        meta = read_meta(path)
        notices = []
        with _scaler_hidden(acc, hide=True):
            try:
                acc.load_state(str(path))
            except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise CheckpointError(f"{path}: cannot be loaded into this run ({type(e).__name__}: {first})") from None
        notices.append(f"resume: loaded {path} (step {meta.get('step', '?')})")
        saved_world = meta.get("world_size")
        if saved_world is not None and saved_world != acc.num_processes:
            if rescale_schedulers:
                # a prepared scheduler steps once per process per optimizer step: rescale its position so the
                # schedule goes on from the same optimizer step
                for sched in acc._schedulers:
                    inner = getattr(sched, "scheduler", sched)
                    inner.last_epoch = inner.last_epoch * acc.num_processes // saved_world
            schedule = ("the schedule at the same optimizer step" if rescale_schedulers
                        else "the scheduler's own position")
            notices.append(
                f"resume: checkpoint was saved by {saved_world} processes, this run has {acc.num_processes}: "
                f"weights, optimizer and scheduler carry over ({schedule}); the data order per process changes"
            )
        notices += self._load_scaler(path, meta, precision, scaler_kwargs or {})
        return notices

    def _load_scaler(self, path: Path, meta: dict[str, Any], precision: str, kwargs: dict[str, Any]) -> list[str]:
        scaler = self.accelerator.scaler
        saved_precision = meta.get("precision", {}).get("effective", "?")
        state = None
        if (path / SCALER).exists():
            state = torch.load(path / SCALER, map_location="cpu", weights_only=False) or None
        if scaler is None or not scaler.is_enabled():
            if state and "scale" in state:
                return [f"resume: checkpoint was {saved_precision} with loss scale {state['scale']:g}, "
                        f"run is {precision} -> no loss scaling, the scale is not used"]
            if saved_precision != precision:
                return [f"resume: checkpoint was {saved_precision}, run is {precision}"]
            return []
        if not state or "scale" not in state:
            return [f"resume: checkpoint was {saved_precision} (no loss scale saved), run is {precision} -> "
                    f"fresh GradScaler at init_scale {kwargs.get('init_scale', scaler.get_scale()):g}"]
        notices = []
        changed = {k: (state[k], v) for k, v in kwargs.items() if k in state and state[k] != v}
        if changed:
            diffs = ", ".join(f"{k} {old:g} -> {new:g}" for k, (old, new) in changed.items())
            notices.append(f"resume: scaler settings differ from the checkpoint; this run's config wins ({diffs})")
        state = {**state, **{k: v for k, v in kwargs.items() if k in state}}
        scaler.load_state_dict(state)
        notices.append(f"resume: loss scale {state['scale']:g} restored (growth tracker {state.get('_growth_tracker', 0)})")
        return notices
