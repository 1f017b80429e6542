"""A user's own example: a classifier on synthetic blobs (the config sections it brings)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class DataConfig:
    """Gaussian blobs, one per class."""

    num_samples: int = 2048  # training samples; a quarter as many more are held out
    features: int = 16  # input features
    classes: int = 4  # blobs
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    """A two-layer MLP."""

    hidden: int = 64  # hidden width
    dropout: float = 0.1  # dropout probability in [0, 1)


RESUME_INCOMPATIBLE = ("model", "data.features", "data.classes", "data.num_samples")
TINY = ["data.num_samples=512", "model.hidden=32"]
WIDE = ["model.hidden=1024"]


def validate(cfg: Any, need: Callable[[bool, str, str, Any], None]) -> None:
    need(cfg.data.num_samples >= 1, "data.num_samples", ">= 1", cfg.data.num_samples)
    need(cfg.data.classes >= 2, "data.classes", ">= 2", cfg.data.classes)
    need(0 <= cfg.model.dropout < 1, "model.dropout", "in [0, 1)", cfg.model.dropout)
