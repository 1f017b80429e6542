"""A user's own example: an MLP classifying Gaussian blobs, written to the interface the loop documents."""

from __future__ import annotations

from typing import Any

from .config import RESUME_INCOMPATIBLE, TINY, WIDE, DataConfig, ModelConfig, validate

NAME = "blobs"
TITLE = "BlobMLP"
EVAL_FIELDS = ("correct", "count", "nll_sum")


class DataError(ValueError):
    """Bad data settings."""


def _blobs(n: int, features: int, classes: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, features, generator=g), y


def build_data(cfg: Any, accelerator: Any) -> tuple[Any, Any, str]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    d = cfg.data
    if d.num_samples < cfg.train.batch_size * accelerator.num_processes:
        raise DataError(f"data.num_samples: {d.num_samples} is fewer than one batch (train.batch_size)")
    train = TensorDataset(*_blobs(d.num_samples, d.features, d.classes, cfg.seed))
    val = TensorDataset(*_blobs(d.num_samples // 4, d.features, d.classes, cfg.seed + 1))
    g = torch.Generator().manual_seed(cfg.seed)
    return (DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, generator=g),
            DataLoader(val, batch_size=cfg.train.batch_size), f"{len(train)} train / {len(val)} val blobs")


def model_class() -> type:
    from .model import BlobMLP

    return BlobMLP


def model_args(config: dict) -> dict:
    data, model = config.get("data") or {}, config.get("model") or {}
    if not isinstance(model.get("hidden"), int):
        raise ValueError(f"config.model.hidden must be an integer, got {model.get('hidden')!r}")
    return {"features": data.get("features"), "hidden": model["hidden"], "classes": data.get("classes"),
            "dropout": model.get("dropout", 0.0)}


def build_model(cfg: Any) -> Any:
    return model_class()(**model_args({"data": vars(cfg.data), "model": vars(cfg.model)}))


def loss(model: Any, batch: Any) -> Any:
    import torch.nn.functional as F

    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def eval_rows(model: Any, batch: Any) -> Any:
    import torch
    import torch.nn.functional as F

    x, y = batch
    logits = model(x).float()
    nll = F.cross_entropy(logits, y, reduction="none")
    return torch.stack([(logits.argmax(-1) == y).double(), torch.ones_like(nll, dtype=torch.float64),
                        nll.double()], 1)


class _Metric:
    """Accuracy and loss from per-batch sums (a plain object with evaluate's add_batch/compute)."""

    def __init__(self):
        self.rows = []

    def add_batch(self, correct, count, nll_sum):
        self.rows += list(zip(correct, count, nll_sum, strict=False))

    def compute(self):
        n = sum(r[1] for r in self.rows)
        out = {"accuracy": sum(r[0] for r in self.rows) / n, "loss": sum(r[2] for r in self.rows) / n}
        self.rows = []
        return out


def load_metric() -> Any:
    return _Metric()


def card(model: Any, package: str) -> tuple[list[tuple[str, str]], str]:
    return [("what", "an MLP on Gaussian blobs")], f"`{package}.example.model_class().from_pretrained(folder)`"


def loss_unit(val_loss: float) -> str:
    return f"{val_loss:.4f} nats"


__all__ = ["EVAL_FIELDS", "NAME", "RESUME_INCOMPATIBLE", "TINY", "TITLE", "WIDE", "DataConfig", "DataError",
           "ModelConfig", "build_data", "build_model", "card", "eval_rows", "load_metric", "loss", "loss_unit",
           "model_args", "model_class", "validate"]
