"""Agreement across processes, at log ticks only (one small collective per interval, never per step)."""

from __future__ import annotations

from typing import Any

import torch


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a stop request, a tripped guard)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item())


def mean_over_ranks(accelerator: Any, metrics: dict[str, float], keys: tuple[str, ...] = ("train/loss",)) -> dict:
    """Average the per-rank values of ``keys`` (e.g. the loss); other metrics are identical on every rank."""
    present = [k for k in keys if k in metrics]
    if accelerator.num_processes > 1 and present:
        vals = accelerator.reduce(torch.tensor([metrics[k] for k in present], device=accelerator.device), "mean")
        metrics.update(zip(present, vals.tolist(), strict=True))
    return metrics
