"""Checkpoints around ``accelerator.save_state``/``load_state``: atomic, rotated, resumable across precisions.

Layout (a superset of what Accelerate writes: a plain ``accelerator.load_state(path)`` of the same prepared objects
loads it, because the session's own state is kept in files Accelerate does not count)::

    out_dir/checkpoints/
      step_0000200/   model.safetensors optimizer.bin scheduler.bin scaler.pt random_states_*.pkl
                      custom_checkpoint_*.pkl (objects you registered with accelerator.register_for_checkpointing)
                      amp_state_*.pt (per process: data position, AMP statistics, what you passed to amp.track)
                      meta.json (precision, scaler kwargs, resolved config, world size, versions, file hashes)
      latest          the name of the newest complete checkpoint, written last

A checkpoint is complete or invisible: it is written into ``.tmp-step_*`` and renamed into place, and
``latest`` moves after that. Resuming under another precision never crashes: the scaler is handled here
(Accelerate raises on a missing or empty scaler.pt, drops the scale silently, and lets scaler.pt replace
the run's GradScalerKwargs), and every decision is returned as a one-line notice.

    ckpt = CheckpointManager(hooks, out_dir, keep=3, meta=lambda: {...}, state=lambda: {...})
    path, notices = find_resume(out_dir, "auto")
    if path: loaded = ckpt.load(path, precision="fp16", scaler_kwargs={...})   # .notices, .state
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
SCALER = "scaler.pt"
STATE = "amp_state_{}.pt"  # the session's state, one file per process
LEGACY_STATE = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl")  # where checkpoints before amp_state kept it
NAME_RE = re.compile(r"^step_(\d{7,})$")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0", "pytorch_model")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount): one line naming the path and the cause."""


def version(dist: str) -> str | None:
    """The installed version of ``dist`` (for meta.json), or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(dist)
    except PackageNotFoundError:
        return None


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


def latest_checkpoint(out_dir: str | Path) -> Path:
    """The checkpoint ``checkpoints/latest`` names (the newest complete one a run saved)."""
    root = Path(out_dir) / CHECKPOINTS
    return root / (root / LATEST).read_text().strip()


def check_layout(out_dir: str | Path) -> None:
    """Refuse, before any training, an ``out_dir`` whose checkpoint folder could not take a save: ``checkpoints``
    that is a file, or ``checkpoints/latest`` that is not one (CheckpointError, one line)."""
    root = Path(out_dir) / CHECKPOINTS
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file; it must be the folder of the checkpoints: move it away")
    if (root / LATEST).exists() and not (root / LATEST).is_file():
        raise CheckpointError(f"{root / LATEST} is a directory; it must be the file naming the newest checkpoint: "
                              "move it away")


def find_resume(out_dir: str | Path, resume: str) -> tuple[Path | None, list[str]]:
    """Pick the checkpoint to resume from: ``none``, ``auto`` (newest complete one) or a path.

    Returns (path or None, notices). A ``resume=PATH`` that is missing, incomplete or corrupt raises CheckpointError;
    under ``auto`` such a checkpoint is skipped with a notice naming the bad part.
    """
    check_layout(out_dir)
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


@dataclass
class Loaded:
    """What :meth:`CheckpointManager.load` restored: one-line notices, and this process's session state (None in a
    checkpoint that has none)."""

    notices: list[str]
    state: dict[str, Any] | None = field(default=None, repr=False)


class _Sink:
    """Takes one registered object's state out of a checkpoint written before the amp_state files existed."""

    def __init__(self) -> None:
        self.state: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _write_failure(tmp: Path, e: BaseException) -> str:
    """Why a save failed, in the user's words: a full disk says so (torch's own words for it are its stream's)."""
    errno_ = getattr(e, "errno", None) or getattr(e.__cause__, "errno", None)
    try:
        free = shutil.disk_usage(tmp.parent if tmp.parent.exists() else tmp.parent.parent).free
    except OSError:
        free = None
    if errno_ == 28 or (free is not None and free < 16 * 2**20):
        where = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return f"no space left on device{where}"
    return _first_line(e)[:200]


class CheckpointManager:
    """Saves and loads checkpoints for one accelerator; see the module docstring for the layout.

    ``meta()`` gives the JSON metadata of a save; ``state()`` gives this process's session state (progress, AMP
    statistics, tracked objects), saved as ``amp_state_<process>.pt`` and handed back by :meth:`load`.
    """

    def __init__(self, hooks: Any, out_dir: str | Path, keep: int, meta: Callable[[], dict[str, Any]],
                 state: Callable[[], dict[str, Any]] | None = None):
        self.accelerator, self.hooks = hooks.accelerator, hooks
        self.root = Path(out_dir) / CHECKPOINTS
        self.keep = keep
        self.meta = meta
        self.state = state
        self._hook = self.accelerator.register_save_state_pre_hook(self._before_save)

    def _before_save(self, models: Any, weights: Any, output_dir: str) -> None:
        # runs inside save_state on every process: each writes its own state, the main process the shared meta.json;
        # the features may change what is saved (bf16-true: the float32 masters are the checkpoint's weights)
        acc = self.accelerator
        self.hooks.call("on_save", weights)
        if self.state is not None:
            torch.save(self.state(), Path(output_dir) / STATE.format(acc.process_index))
        if acc.is_main_process:
            meta = dict(self.meta())
            meta.update(complete=False, world_size=acc.num_processes, amp_state=self.state is not None)
            _atomic_write(Path(output_dir) / META, json.dumps(meta, indent=2, default=str))

    def save(self, step: int) -> Path:
        """Save the full training state as ``step_NNNNNNN``; every process must call this."""
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
            with self.hooks.scaler_hidden(hide=not acc.is_main_process):
                acc.save_state(str(tmp))
        except BaseException as e:  # a half-written checkpoint never stays, whatever stopped it (a second Ctrl-C)
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, Exception):
                raise
            # OSError, or safetensors' and torch's own errors for the same faults (a full disk)
            raise CheckpointWriteError(f"{tmp}: cannot write the checkpoint ({_write_failure(tmp, e)})") from e
        acc.wait_for_everyone()
        if acc.is_main_process:
            try:
                self._seal(tmp, final)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if not isinstance(e, Exception):
                    raise
                raise CheckpointWriteError(f"{tmp}: cannot write the checkpoint ({_write_failure(tmp, e)})") from e
        acc.wait_for_everyone()
        return final

    def _seal(self, tmp: Path, final: Path) -> None:
        """Hash every part, mark complete, rename into place, then move ``latest`` and rotate."""
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

    def _rotate(self) -> None:
        # oldest first by save order: a run resumed from an older checkpoint keeps its own new saves; a checkpoint
        # whose meta.json cannot be read is not this run's to delete
        ckpts = [p for p in list_checkpoints(self.root.parent) if _order(p)[0] != UNREADABLE]
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def resume(self, policy: str, precision: str, scaler_kwargs: dict[str, Any] | None, check: Any = None,
               rescale_schedulers: bool = False, log: Path | None = None) -> tuple[Path | None, dict | None, Loaded]:
        """The checkpoint ``policy`` names (:func:`find_resume`), checked by ``check(meta)`` (notices, or it raises),
        loaded (:meth:`load`); an earlier run in out_dir moves aside for a fresh start or a checkpoint from elsewhere,
        and records of ``log`` (metrics.jsonl) past the checkpoint's step are dropped. (path, meta, what loaded)."""
        from .rundir import move_aside

        acc, out_dir = self.accelerator, self.root.parent
        path, notices = find_resume(out_dir, policy)
        meta = read_meta(path) if path is not None else None
        if meta is not None and check is not None:
            notices += list(check(meta) or [])
        elsewhere = path is not None and Path(path).resolve().parent != self.root.resolve()
        if path is None or elsewhere:  # a fresh start, or another line of runs starts here
            why = f"resume from {path}" if path is not None else "fresh start"
            notices += move_aside(out_dir, why) if acc.is_main_process else []
            acc.wait_for_everyone()
        if path is None:
            return None, None, Loaded(notices)
        loaded = self.load(path, precision, scaler_kwargs, rescale_schedulers)
        loaded.notices[:0] = notices
        step = meta.get("step")
        if log is not None and acc.is_main_process and isinstance(step, int) and (n := trim_log(log, step)):
            loaded.notices.append(f"resume: dropped {n} {log.name} records logged after step {step}")
        return path, meta, loaded

    def load(self, path: str | Path, precision: str, scaler_kwargs: dict[str, Any] | None,
             rescale_schedulers: bool = False) -> Loaded:
        """Load a checkpoint into the prepared objects; returns one-line notices and the session state.

        The scaler is handled here, for all nine pairs of fp32/bf16/fp16: scale and growth tracker come from the
        checkpoint when both runs are fp16, while the current run's scaler knobs win (a changed ``init_scale``
        starts the scale there). ``rescale_schedulers``: for schedules written in optimizer steps (a prepared
        scheduler steps once per process per optimizer step), move their position when the number of processes
        changed.
        """
        acc = self.accelerator
        path = Path(path)
        meta = read_meta(path)
        # checkpoints written before the amp_state files kept the session's state as the first registered objects
        legacy = [] if meta.get("amp_state") else [_Sink() for name in LEGACY_STATE if (path / name).is_file()]
        acc._custom_objects[:0] = legacy
        try:
            with self.hooks.scaler_hidden():
                acc.load_state(str(path))
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            detail = " ".join(ln.strip() for ln in str(e).strip().splitlines())  # torch puts the key names below
            raise CheckpointError(f"{path}: cannot be loaded into this run ({type(e).__name__}: {detail[:400]})"
                                  ) from None
        finally:
            del acc._custom_objects[: len(legacy)]
        self.hooks.call("on_load", path, list(acc._models))
        notices = [f"resume: loaded {path} (step {meta.get('step', '?')})"]
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
                f"resume: checkpoint was saved by {saved_world} process{'es' if saved_world != 1 else ''}, this run "
                f"has {acc.num_processes}: weights, optimizer and scheduler carry over ({schedule}); the data order "
                "per process changes"
            )
        notices += self._load_scaler(path, meta, precision, scaler_kwargs or {})
        if legacy:
            return Loaded(notices, {"progress": legacy[0].state, "monitor": legacy[1].state if len(legacy) > 1 else None})
        return Loaded(notices, self._read_state(path))

    def _read_state(self, path: Path) -> dict[str, Any] | None:
        """This process's amp_state file, or the main process's when this process had none (fewer processes then)."""
        for index in dict.fromkeys((self.accelerator.process_index, 0)):
            file = path / STATE.format(index)
            if file.is_file():
                try:
                    state = torch.load(file, map_location="cpu", weights_only=False)
                except Exception as e:  # a damaged file that passed no hash check (a checkpoint without hashes)
                    raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {_first_line(e)[:200]})") from None
                if not isinstance(state, dict):
                    raise CheckpointError(f"{file}: does not hold the session's state")
                return state
        return None

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
        saved = {**{k: state[k] for k in kwargs if k in state}, **(meta.get("scaler_kwargs") or {})}
        changed = {k: (saved[k], v) for k, v in kwargs.items() if k in saved and saved[k] != v}
        if changed:
            diffs = ", ".join(f"{k} {old:g} -> {new:g}" for k, (old, new) in changed.items())
            notices.append(f"resume: scaler settings differ from the checkpoint; this run's config wins ({diffs})")
        state = {**state, **{k: v for k, v in kwargs.items() if k in state}}
        if "init_scale" in changed:  # asked for on purpose (a collapsed scale, say): the scale starts there
            notices.append(f"resume: loss scale starts again at init_scale {kwargs['init_scale']:g} "
                           f"(the checkpoint's was {state['scale']:g})")
            state.update(scale=float(kwargs["init_scale"]), _growth_tracker=0)
        else:
            notices.append(f"resume: loss scale {state['scale']:g} restored "
                           f"(growth tracker {state.get('_growth_tracker', 0)})")
        scaler.load_state_dict(state)
        return notices
