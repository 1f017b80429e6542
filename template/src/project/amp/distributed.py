"""Agreement across processes, at log ticks only (one small collective per interval, never per step)."""

from __future__ import annotations

from typing import Any

import torch


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a held lock, a tripped guard)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item())
