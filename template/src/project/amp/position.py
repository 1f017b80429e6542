"""Where a run is in its data, the loop's own state (``amp.track``), and the iteration that resumes exactly."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .rundir import shield_workers


class LoopError(RuntimeError):
    """The loop uses the session in a way that cannot work (the message is one line saying what to change)."""


@dataclass
class Progress:
    """Where the run is; saved with every checkpoint so a resume continues at the same place."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done: the index of the epoch in progress, from 0
    batch_in_epoch: int = 0  # batches consumed in the current epoch (per process)
    samples_seen: int = 0  # over all processes
    tokens_seen: int = 0
    epoch_rng: torch.Tensor | None = field(default=None, repr=False)  # CPU RNG state as the epoch's iteration began
    _counted: list[Any] = field(default_factory=lambda: [0, 0, None, None], repr=False)  # since the last step: the
    # batches' samples and tokens, and those the loop gave (None: it gave none)

    _INTS = ("step", "epoch", "batch_in_epoch", "samples_seen", "tokens_seen")

    def count(self, batch: Any = None, samples: int | None = None, tokens: int | None = None) -> None:
        """A batch drawn, or the counts the loop gives for a micro-batch (summed over a step's micro-batches)."""
        c = self._counted
        if batch is not None:
            self.batch_in_epoch += 1
            c[0], c[1] = (a + b for a, b in zip(c[:2], count(batch), strict=True))
        c[2] = c[2] if samples is None else (c[2] or 0) + samples
        c[3] = c[3] if tokens is None else (c[3] or 0) + tokens

    def advance(self, processes: int) -> None:
        """One optimizer step done; each process counted as many samples and tokens as this one."""
        c, self._counted = self._counted, [0, 0, None, None]
        self.step += 1
        self.samples_seen += (c[0] if c[2] is None else c[2]) * processes
        self.tokens_seen += (c[1] if c[3] is None else c[3]) * processes

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._INTS}, "epoch_rng": self.epoch_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in (k for k in self._INTS if k in state):
            setattr(self, k, int(state[k]))
        self.epoch_rng = state["epoch_rng"] if isinstance(state.get("epoch_rng"), torch.Tensor) else None


class Tracked:
    """The loop's own state in every checkpoint (``amp.track``), by name; a name tracked after resume gets it then."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._waiting: dict[str, Any] = {}  # loaded for names not tracked yet

    def add(self, obj: Any, name: str | None = None) -> Any:
        if not isinstance(obj, dict) and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"amp.track() takes a dict or an object with state_dict()/load_state_dict(), "
                            f"got {type(obj).__name__}")
        name = name or f"tracked_{len(self.objects)}"
        if name in self.objects:
            raise ValueError(f"amp.track(): the name {name!r} is taken")
        self.objects[name] = obj
        if name in self._waiting:
            self._restore(name, self._waiting.pop(name))
        return obj

    def _restore(self, name: str, state: Any) -> None:
        obj = self.objects[name]
        obj.update(state) if isinstance(obj, dict) else obj.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {n: dict(o) if isinstance(o, dict) else o.state_dict() for n, o in self.objects.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> list[str]:
        """Restore what is tracked; returns a notice for each tracked name the checkpoint holds nothing for."""
        saved = dict(saved)
        notices = [f"resume: the checkpoint holds nothing for amp.track(..., name={n!r}); it keeps its value"
                   for n in self.objects if n not in saved]
        for name in [n for n in saved if n in self.objects]:
            self._restore(name, saved.pop(name))
        self._waiting = saved
        return notices


def count(batch: Any) -> tuple[int, int]:
    """(samples, tokens) of a batch: the leading size of its first tensor; tokens for integer (B, T) inputs."""
    first = first_tensor(batch)
    if first is None or first.dim() == 0:
        return 0, 0
    return first.shape[0], (first.numel() if first.dim() == 2 and not first.is_floating_point() else 0)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The batch itself, or the first tensor of a tuple/list or a mapping (a dict, a BatchEncoding)."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if hasattr(batch, "values") else batch if isinstance(batch, (list, tuple)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


_END = object()


def epoch(source: Iterable[Any], p: Progress, accelerator: Any, last: list[Any]) -> Iterator[Any]:
    """One epoch of ``source`` from ``p``; ``last`` keeps the last iterator alive (no new one can reuse its id)."""
    if not isinstance(source, Iterable):
        raise LoopError(f"amp.batches() needs an iterable of batches (a DataLoader, a range, a list, a generator), "
                        f"got {type(source).__name__}")
    if iter(source) is source:  # an iterator: its items are used up once drawn
        if last and last[0] is source:
            raise LoopError("amp.batches() got the same iterator again, whose batches are used up: pass a new one each "
                            "epoch (call the generator function again)")
        last[:] = [source]
    skip = p.batch_in_epoch
    if isinstance(source, torch.utils.data.DataLoader):
        shield_workers(source)
        source, skip = accelerator.skip_first_batches(source, skip) if skip else source, 0
        if hasattr(source, "set_epoch"):
            source.set_epoch(p.epoch)
    resumed = p.batch_in_epoch > 0 and p.epoch_rng is not None
    if not resumed:
        p.epoch_rng = torch.get_rng_state()
    with torch.random.fork_rng(devices=[], enabled=resumed):  # puts the run's RNG state back after a replay
        if resumed:
            torch.set_rng_state(p.epoch_rng)  # the draws of the epoch's start, as the saved run made them
        it = iter(source)
        first = next(it, _END)  # draws what the epoch's start draws (base seed, shuffle order)
        if skip and first is not _END:
            first = next(itertools.islice(it, skip - 1, None), _END)
    return it if first is _END else itertools.chain([first], it)
