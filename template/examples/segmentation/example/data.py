"""The U-Net's data: images of 1 to ``max_shapes`` shapes (circle, square, triangle of one area; ids 1-3) with noise,
drawn from seeds derived from ``data.seed``, the same on every machine; vectorised, kept in memory as tensors."""

import hashlib
import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from . import DataError

CLASSES = ("background", "circle", "square", "triangle")
_CHUNK = 1024  # images rasterised at once: bounds the temporary memory, not the result


def split_seed(seed: int, split: str) -> int:
    """A 63-bit seed for one split (``train``, ``val``, ``sample``...) derived from ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little") >> 1


def draw_shapes(n: int, size: int, max_shapes: int = 3, noise: float = 0.1,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float32, (n, 1, size, size)) and their masks (int64, (n, size, size)), the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    k = max_shapes

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    count = torch.randint(1, k + 1, (n,), generator=g)
    cls = torch.randint(1, len(CLASSES), (n, k), generator=g)
    radius = uniform(0.14, 0.28, n, k) * size  # the circle's radius; the other shapes have the same area
    cx = radius + (size - 2 * radius) * torch.rand(n, k, generator=g)
    cy = radius + (size - 2 * radius) * torch.rand(n, k, generator=g)
    angle = uniform(0.0, 2 * math.pi, n, k)
    level = uniform(0.45, 1.0, n, k)
    background = uniform(0.0, 0.3, n)
    pixel_noise = torch.randn(n, size, size, generator=g) * noise

    images = torch.empty(n, 1, size, size)
    masks = torch.empty(n, size, size, dtype=torch.int64)
    centre = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = centre[:, None], centre[None, :]
    for lo in range(0, n, _CHUNK):
        s = slice(lo, min(n, lo + _CHUNK))
        img = background[s, None, None].expand(-1, size, size).clone()
        mask = torch.zeros(img.shape, dtype=torch.int64)
        for j in range(k):
            r = radius[s, j, None, None]
            dx, dy = xs - cx[s, j, None, None], ys - cy[s, j, None, None]
            cos, sin = angle[s, j, None, None].cos(), angle[s, j, None, None].sin()
            u, v = dx * cos + dy * sin, dy * cos - dx * sin
            circle = dx * dx + dy * dy <= r * r
            square = torch.maximum(u.abs(), v.abs()) <= r * (math.pi**0.5 / 2)  # area pi r^2
            # equilateral triangle of circumradius R: inside when every edge's outward normal projection <= R / 2
            big_r = r * (4 * math.pi / (3 * 3**0.5)) ** 0.5  # area pi r^2
            proj = torch.stack([u * math.cos(a) + v * math.sin(a) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)])
            triangle = proj.amax(0) <= big_r / 2
            c = cls[s, j, None, None]
            inside = torch.where(c == 1, circle, torch.where(c == 2, square, triangle))
            inside &= (j < count[s])[:, None, None]
            mask = torch.where(inside, c, mask)
            img = torch.where(inside, level[s, j, None, None], img)
        images[s, 0] = img + pixel_noise[s]
        masks[s] = mask
    return images, masks


def make_splits(num_train: int, num_val: int, size: int, max_shapes: int, noise: float,
                seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, validation) datasets of (image, mask) pairs, drawn from seeds derived from ``seed``."""
    train = draw_shapes(num_train, size, max_shapes, noise, split_seed(seed, "train"))
    val = draw_shapes(num_val, size, max_shapes, noise, split_seed(seed, "val"))
    return TensorDataset(*train), TensorDataset(*val)


def check_enough(num_train: int, batch_size: int, num_processes: int) -> None:
    """Refuse a training split under one global batch: the loader drops it, the loop would wait forever for one."""
    need = batch_size * num_processes
    if num_train < need:
        raise DataError(f"data.num_train: {num_train} training images, fewer than one batch of {need} (train."
                        f"batch_size={batch_size} x {num_processes} process{'es' if num_processes != 1 else ''}); "
                        "raise data.num_train or lower train.batch_size")


def make_loader(ds: TensorDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch (``set_epoch``), so resume is exact."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
