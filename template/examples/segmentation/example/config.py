"""The example's config sections: ``data`` (synthetic shapes) and ``model`` (the U-Net), their checks, and what a
resume must keep. Standard library only (``config.py`` imports it before torch); field comments are ``--help``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class DataConfig:
    """Synthetic images of circles, squares and triangles, drawn from a seed (no download, no files)."""

    image_size: int = 48  # height and width in pixels; a multiple of 2**(model.depth - 1)
    num_train: int = 8192  # training images
    num_val: int = 512  # validation images (another seed than the training ones)
    max_shapes: int = 3  # shapes per image: 1 to max_shapes, later ones drawn over earlier ones
    noise: float = 0.1  # standard deviation of the Gaussian pixel noise
    seed: int = 0  # the shapes' seed (train and val use seeds derived from it); not the run's seed
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    """The small 2-D U-Net (conv-BatchNorm-ReLU blocks, skip connections)."""

    base_channels: int = 16  # channels of the first level; doubled at each level down
    depth: int = 3  # resolution levels (depth - 1 poolings)
    dropout: float = 0.0  # Dropout2d probability in [0, 1), at the bottom of the U and in the decoder


# Keys a checkpoint cannot be resumed under when they change: the weights would not load (model.*), or the run
# would silently become another experiment (other images). An entry names a key or a whole section.
RESUME_INCOMPATIBLE = ("model", "data.image_size", "data.num_train", "data.num_val", "data.max_shapes", "data.noise",
                       "data.seed")

# The tests' seconds-long size: a tiny U-Net on a few hundred small images (the core's tests use it too).
TINY = ["data.image_size=32", "data.num_train=256", "data.num_val=64", "model.base_channels=8", "model.depth=2"]
# A model wide enough for `bench` to show what a precision gains (bench --help, the README).
WIDE = ["model.base_channels=32"]


def validate(cfg: Any, need: Callable[[bool, str, str, Any], None]) -> None:
    """Check the example's ranges; ``need(ok, key, allowed, value)`` raises the config's one-line error."""
    m = cfg.model
    need(1 <= m.depth <= 6, "model.depth", "between 1 and 6", m.depth)
    need(m.base_channels >= 1, "model.base_channels", ">= 1", m.base_channels)
    need(0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    d = cfg.data
    step = 2 ** (m.depth - 1)
    need(d.image_size >= max(8, step) and d.image_size % step == 0, "data.image_size",
         f"a multiple of {step} (2**(model.depth - 1)), at least {max(8, step)}", d.image_size)
    need(d.num_train >= 1, "data.num_train", ">= 1", d.num_train)
    need(d.num_val >= 1, "data.num_val", ">= 1", d.num_val)
    need(1 <= d.max_shapes <= 16, "data.max_shapes", "between 1 and 16", d.max_shapes)
    need(0 <= d.noise <= 1, "data.noise", "in [0, 1]", d.noise)
    need(0 <= d.seed < 2**63, "data.seed", "between 0 and 2**63 - 1", d.seed)
    need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
