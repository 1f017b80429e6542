"""A small 2-D U-Net that labels every pixel: background, circle, square or triangle. Images (batch, 1, H, W) in,
logits (batch, 4, H, W) out, H and W multiples of 2**(depth - 1); ``ShapesUNet.from_pretrained("final/")`` loads one."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_model
from torch import nn

from .config import DataConfig, ModelConfig, validate

IN_CHANNELS = 1
NUM_CLASSES = 4  # background + circle, square, triangle


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU); the convs have no bias (BatchNorm adds one)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the encoder's skip, then a ConvBlock."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.drop = nn.Dropout2d(dropout)
        self.block = ConvBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.drop(torch.cat([skip, self.up(x)], 1)))


class ShapesUNet(nn.Module, PyTorchModelHubMixin, tags=["image-segmentation", "u-net", "amptpl"]):
    """U-Net over ``depth`` resolution levels; ``image_size`` is the size it was trained on. The mixin adds no
    parameter or buffer: the model.safetensors of a training checkpoint loads as it is."""

    def __init__(self, image_size: int = 32, base_channels: int = 16, depth: int = 3, dropout: float = 0.0):
        super().__init__()
        self.image_size = image_size
        widths = [base_channels * 2**i for i in range(depth)]
        self.down = nn.ModuleList(ConvBlock(a, b) for a, b in zip([IN_CHANNELS, *widths], widths, strict=False))
        self.drop = nn.Dropout2d(dropout)
        self.up = nn.ModuleList(Up(b, a, dropout) for a, b in reversed(list(zip(widths, widths[1:], strict=False))))
        self.head = nn.Conv2d(widths[0], NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        x = self.drop(skips.pop())
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs) -> ShapesUNet:
        # The mixin loads with strict=False (a missing weight would stay random, silently) and prints a line to stdout
        # for a local directory: load one strictly and quietly. **kwargs: hub arguments and config.json's.
        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
        given = {k: v for k, v in kwargs.items() if k in cls._hub_mixin_init_parameters}
        _check_export(given, Path(model_id) / "config.json")
        model = cls(**given).to(map_location)
        load_model(model, Path(model_id) / "model.safetensors", strict=strict, device=map_location)
        return model.eval()


def _check_export(given: dict, where: Path) -> None:
    """An export's config.json, checked as training checks the config (ValueError naming the field)."""
    def need(ok: bool, key: str, allowed: str, value: object) -> None:
        if not ok:
            raise ValueError(f"{where}: {key.split('.')[-1]}: must be {allowed}, got {value!r}")

    for key, value in given.items():
        need(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
    model = ModelConfig(**{k: v for k, v in given.items() if k != "image_size"})
    validate(SimpleNamespace(model=model, data=DataConfig(image_size=given.get("image_size", 32))), need)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice over the foreground classes, summed over the batch), in float32 with autocast
    off; ``eps`` keeps a class absent from the batch and not predicted at Dice 1."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        prob = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        inter = (prob * onehot).sum((0, 2, 3))
        total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = (2 * inter + eps) / (total + eps)
        return ce + 1 - dice.mean()
