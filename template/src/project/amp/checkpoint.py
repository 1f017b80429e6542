"""Checkpoints: complete or invisible, verified, rotated, and resumable across precisions, each decision said."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS, LATEST, META, SCALER = "checkpoints", "latest", "meta.json", "scaler.pt"
STATE = "amp_state_{}.pt"  # the session's state, one file per process
NAME_RE = re.compile(r"^step_(\d{7,})$")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0", "pytorch_model")
SOFT_PARTS = re.compile(r"^random_states_\d+\.pkl$")  # losing one costs bit-exactness only: a notice, not a refusal
UNREADABLE = 2**62  # the save sequence of a checkpoint whose meta.json cannot be read: newest, to be looked at first


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount): one line naming the path and the cause."""


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {META} ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {META} does not hold a JSON object")
    step, prec = meta.get("step", 0), meta.get("precision")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:  # a hand-edited file: named, never a traceback
        raise CheckpointError(f"{Path(path) / META}: step must be a whole number >= 0, got {step!r}")
    if prec is not None and not (isinstance(prec, dict) and isinstance(prec.get("effective", ""), str)):
        raise CheckpointError(f"{Path(path) / META}: precision must be an object with an 'effective' name, got {prec!r}")
    return meta


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


_VERIFIED: dict[str, tuple[Any, list[str]]] = {}  # path -> (stat of its files, notices): hashed once while unchanged


def check_complete(path: Path) -> list[str]:
    """Raise CheckpointError unless ``path`` is complete and its parts verify; notices for bad RNG states only."""
    path, stamp = Path(path), None
    with contextlib.suppress(OSError):
        stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
    if stamp is not None and _VERIFIED.get(str(path), (None,))[0] == stamp:
        return list(_VERIFIED[str(path)][1])
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    meta = read_meta(path)
    if not meta.get("complete"):
        raise CheckpointError(f"{path}: {META} does not mark it complete")
    if not any((path / f).exists() for f in MODEL_FILES):
        raise CheckpointError(f"{path}: no model weights ({' or '.join(MODEL_FILES[:2])})")
    files, notices = meta.get("files", []), []
    for name, want in sorted((files if isinstance(files, dict) else dict.fromkeys(files)).items()):
        part, why = path / name, None
        if not part.is_file():
            why = "missing"
        elif isinstance(want, dict) and part.stat().st_size != want.get("size"):  # older checkpoints list names only
            why = f"{part.stat().st_size} bytes, {want.get('size')} when saved"
        elif isinstance(want, dict) and "sha256" in want and _digest(part)["sha256"] != want["sha256"]:
            why = "content differs from what was saved"
        if why and SOFT_PARTS.match(name):
            notices.append(f"resume: {part} is unreadable ({why}): the resume is not bit-exact (that process's RNG "
                           "state is lost)")
        elif why:
            raise CheckpointError(f"{part}: {why}")
    _VERIFIED[str(path)] = (stamp, notices)
    return list(notices)


def _order(path: Path) -> tuple[int, int]:
    """(save sequence, step): a checkpoint saved later sorts later whatever its step (0 before the sequence existed)."""
    seq = UNREADABLE
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        seq = int(json.loads((path / META).read_text()).get("seq", 0))
    m = NAME_RE.match(path.name)
    return seq, int(m.group(1)) if m else 0


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories under ``out_dir/checkpoints``, oldest first by when they were saved (complete or not)."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=_order)


def latest_checkpoint(out_dir: str | Path) -> Path:
    """The checkpoint ``checkpoints/latest`` names (the newest complete one a run saved)."""
    root = Path(out_dir) / CHECKPOINTS
    return root / (root / LATEST).read_text().strip()


def find_resume(out_dir: str | Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint for ``none``, ``auto`` (the newest complete one) or a path, and its notices."""
    root = Path(out_dir) / CHECKPOINTS
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file; it must be the folder of the checkpoints: move it away")
    if (root / LATEST).exists() and not (root / LATEST).is_file():
        raise CheckpointError(f"{root / LATEST} is a directory; it must be the file naming the newest checkpoint: "
                              "move it away")
    if resume == "none":
        said = [f"resume: starting fresh as asked, although {root} holds checkpoints"] if list_checkpoints(out_dir) else []
        return None, said
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"resume: no such checkpoint: {resume}")
        if path.is_dir() and not (path / META).exists() and any((path / f).exists() for f in MODEL_FILES):
            return path, [f"resume: {path} is a plain accelerator.save_state checkpoint (no {META}): loaded as it is, "
                          "unverified, without the session's state"]
        return path, check_complete(path)
    notices: list[str] = []  # newest complete wins; `latest` lags by one save after a crash between rename and update
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, notices + check_complete(path)
        except CheckpointError as e:
            notices.append(f"resume: skipping incomplete checkpoint ({e})")
    return None, notices


def trim_log(path: str | Path, step: int) -> int:
    """Drop JSON-lines records past ``step`` and half-written ones; returns how many."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines(keepends=True)

    def keep(line: str) -> bool:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            return isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step
        return False

    kept = [ln for ln in lines if ln.strip() and keep(ln)]
    if len(kept) != len(lines):
        _atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


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
    old = dest.with_name(f".old-{dest.name}")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _writing(tmp: Path) -> Any:
    """A failed write removes the half-written folder (after a second Ctrl-C too) and says why: a full disk as such."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        errno_ = getattr(e, "errno", None) or getattr(e.__cause__, "errno", None)
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(tmp.parent if tmp.parent.exists() else tmp.parent.parent).free
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if errno_ == 28 or (free is not None and free < 16 * 2**20):
            why = "no space left on device" + (f" ({free / 2**20:.1f} MiB free)" if free is not None else "")
        raise CheckpointWriteError(f"{tmp}: cannot write the checkpoint ({why})") from e


class CheckpointManager:
    """The checkpoints of one session; the features' ``on_save``/``on_load`` change what is saved and restored."""

    def __init__(self, hooks: Any, out_dir: str | Path, keep: int, meta: Callable[[], dict[str, Any]],
                 state: Callable[[], dict[str, Any]]):
        self.accelerator, self.hooks = hooks.accelerator, hooks
        self.root, self.keep, self.meta, self.state = Path(out_dir) / CHECKPOINTS, keep, meta, state
        self.accelerator.register_save_state_pre_hook(self._before_save)

    def _before_save(self, models: Any, weights: Any, output_dir: str) -> None:
        # inside save_state on every process: each writes its own state, the main process the shared meta.json
        acc = self.accelerator
        self.hooks.call("on_save", weights)
        torch.save(self.state(), Path(output_dir) / STATE.format(acc.process_index))
        if acc.is_main_process:
            meta = {**self.meta(), "complete": False, "world_size": acc.num_processes, "amp_state": True}
            _atomic_write(Path(output_dir) / META, json.dumps(meta, indent=2, default=str))

    def save(self, step: int) -> Path:
        """Save the full training state as ``step_NNNNNNN``; every process must call this."""
        acc = self.accelerator
        final, tmp = self.root / f"step_{step:07d}", self.root / f".tmp-step_{step:07d}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        # Accelerate writes scaler.pt from every rank to the same path: only the main process writes it
        with _writing(tmp), self.hooks.scaler_hidden(hide=not acc.is_main_process):
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            with _writing(tmp):
                self._seal(tmp, final)
        acc.wait_for_everyone()
        return final

    def _seal(self, tmp: Path, final: Path) -> None:
        meta = json.loads((tmp / META).read_text())
        meta["files"] = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != META}
        saved = [p for p in list_checkpoints(self.root.parent) if _order(p)[0] != UNREADABLE]
        meta["seq"], meta["complete"] = 1 + max((_order(p)[0] for p in saved), default=0), True
        _atomic_write(tmp / META, json.dumps(meta, indent=2, default=str))
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # the same step again replaces it (e.g. stop right after a periodic save)
        _fsync_dir(self.root)
        _atomic_write(self.root / LATEST, final.name + "\n")
        # oldest first by save order (a run resumed from an older one keeps its new saves); unreadable: not ours
        saved = [p for p in list_checkpoints(self.root.parent) if _order(p)[0] != UNREADABLE]
        for old in [*saved[: max(0, len(saved) - self.keep)], *self.root.glob(".tmp-step_*")]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, policy: str, precision: str, scaler_kwargs: dict[str, Any] | None, check: Any = None,
               rescale_schedulers: bool = False, log: Path | None = None, also: tuple[str, ...] = ()
               ) -> tuple[Any, dict | None, list[str], Any]:
        """``(path, meta, notices, this process's state)`` of the checkpoint ``policy`` names, or of a fresh start."""
        from .rundir import move_aside

        acc, out_dir = self.accelerator, self.root.parent
        path, notices = find_resume(out_dir, policy)
        meta = (read_meta(path) if (path / META).exists() else {}) if path is not None else None
        notices += list(check(meta) or []) if meta is not None and check is not None else []
        if path is None or Path(path).resolve().parent != self.root.resolve():  # a fresh start, or a new line of runs
            why = f"resume from {path}" if path else "fresh start"
            notices += move_aside(out_dir, why, also) if acc.is_main_process else []
            acc.wait_for_everyone()
        if path is None:
            return None, None, notices, None
        try:
            with self.hooks.scaler_hidden():
                acc.load_state(str(path))
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            detail = " ".join(ln.strip() for ln in str(e).strip().splitlines())  # torch puts the key names below
            raise CheckpointError(f"{path}: cannot be loaded into this run ({type(e).__name__}: {detail[:400]})"
                                  ) from None
        self.hooks.call("on_load", path, list(acc._models))
        notices.append(f"resume: loaded {path}" + (f" (step {meta['step']})" if "step" in meta else ""))
        saved, now = meta.get("world_size"), acc.num_processes
        if saved is not None and saved != now:
            for sched in acc._schedulers if rescale_schedulers else ():
                inner = getattr(sched, "scheduler", sched)
                inner.last_epoch = inner.last_epoch * now // saved
            schedule = "the schedule at the same optimizer step" if rescale_schedulers else "the scheduler's own position"
            notices.append(f"resume: checkpoint was saved by {saved} process{'es' if saved != 1 else ''}, this run has "
                           f"{now}: weights, optimizer and scheduler carry over ({schedule}); the data order per "
                           "process changes")
        notices += self._load_scaler(path, meta, precision, scaler_kwargs or {})
        step = meta.get("step")
        if log is not None and acc.is_main_process and isinstance(step, int) and (n := trim_log(log, step)):
            notices.append(f"resume: dropped {n} {log.name} records logged after step {step}")
        for index in dict.fromkeys((acc.process_index, 0)):  # this process's, or the main's (fewer processes then)
            file = path / STATE.format(index)
            if file.is_file():
                try:
                    state = torch.load(file, map_location="cpu", weights_only=False)
                except Exception as e:  # a damaged file that passed no hash check (a checkpoint without hashes)
                    why = (str(e).strip().splitlines() or [""])[0][:200]
                    raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {why})") from None
                if not isinstance(state, dict):
                    raise CheckpointError(f"{file}: does not hold the session's state")
                return path, meta, notices, state
        return path, meta, notices, None

    def _load_scaler(self, path: Path, meta: dict[str, Any], precision: str, kwargs: dict[str, Any]) -> list[str]:
        scaler = self.accelerator.scaler
        was = (meta.get("precision") or {}).get("effective", "of an unrecorded precision")
        state = torch.load(path / SCALER, map_location="cpu", weights_only=False) if (path / SCALER).exists() else None
        if scaler is None or not scaler.is_enabled():
            if state and "scale" in state:
                return [f"resume: checkpoint was {was} with loss scale {state['scale']:g}, run is {precision} -> no "
                        "loss scaling, the scale is not used"]
            return [f"resume: checkpoint was {was}, run is {precision}"] if was != precision and meta else []
        if not state or "scale" not in state:
            return [f"resume: checkpoint was {was} (no loss scale saved), run is {precision} -> fresh GradScaler at "
                    f"init_scale {kwargs.get('init_scale', scaler.get_scale()):g}"]
        saved = {**{k: state[k] for k in kwargs if k in state}, **(meta.get("scaler_kwargs") or {})}
        changed = {k: (saved[k], v) for k, v in kwargs.items() if k in saved and saved[k] != v}
        notices = [f"resume: scaler settings differ from the checkpoint; this run's config wins "
                   f"({', '.join(f'{k} {old:g} -> {new:g}' for k, (old, new) in changed.items())})"] if changed else []
        state = {**state, **{k: v for k, v in kwargs.items() if k in state}}
        if "init_scale" in changed:  # asked for on purpose (a collapsed scale, say): the scale starts there
            notices.append(f"resume: loss scale starts again at init_scale {kwargs['init_scale']:g} (the checkpoint's "
                           f"was {state['scale']:g})")
            state.update(scale=float(kwargs["init_scale"]), _growth_tracker=0)
        else:
            notices.append(f"resume: loss scale {state['scale']:g} restored (growth tracker "
                           f"{state.get('_growth_tracker', 0)})")
        scaler.load_state_dict(state)
        return notices
