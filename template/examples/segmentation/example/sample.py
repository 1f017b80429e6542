"""Segment fresh shape images with a trained U-Net and write them as one PNG: input | truth | prediction per row."""

import struct
import sys
import zlib
from pathlib import Path

import torch

from ..configparse import UsageError, UsageParser
from ..export import PACKAGE, ExportError, device_arg, load_model
from ..faults import write_status
from .config import DataConfig
from .data import draw_shapes, split_seed

# RGB per class id: background, circle, square, triangle
PALETTE = torch.tensor([[24, 24, 24], [230, 75, 60], [60, 180, 75], [70, 130, 230]], dtype=torch.uint8)
GAP = 2  # pixels between tiles (before scaling)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_bytes(rgb: torch.Tensor) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (uint8, (height, width, 3)), with the standard library's zlib only."""
    height, width, _ = rgb.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rgb.reshape(height, width * 3)], 1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    raw = bytes(rows.contiguous().view(-1).tolist())
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def grid(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """One uint8 RGB picture: a row per image of (input in grey | truth | prediction), tiles ``scale`` times larger."""
    n, _, h, w = images.shape
    grey = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)[..., None].expand(-1, -1, -1, 3)
    tiles = [grey, PALETTE[truth.cpu()], PALETTE[pred.cpu()]]
    out = torch.full((n * (h + GAP) + GAP, 3 * (w + GAP) + GAP, 3), 255, dtype=torch.uint8)
    for row in range(n):
        for col, tile in enumerate(tiles):
            top, left = GAP + row * (h + GAP), GAP + col * (w + GAP)
            out[top : top + h, left : left + w] = tile[row]
    return out.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def mean_dice(truth: torch.Tensor, pred: torch.Tensor, num_classes: int = 4) -> float:
    """Dice per shape class over all the images' pixels, averaged over the classes present or predicted."""
    dices = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        both = int(p.sum() + t.sum())
        if both:
            dices.append(2 * int((p & t).sum()) / both)
    return sum(dices) / len(dices) if dices else float("nan")


def segment(model: torch.nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` validation-like images drawn from ``seed``, their masks, and the model's labels (all on the CPU)."""
    d = DataConfig()
    images, masks = draw_shapes(n, model.image_size, d.max_shapes, d.noise, split_seed(seed, "sample"))
    device = next(model.parameters()).device
    with torch.no_grad():
        pred = model(images.to(device)).argmax(1).cpu()
    return images, masks, pred


def main(argv: list[str] | None = None) -> int:
    parser = UsageParser(prog=f"python -m {PACKAGE}.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="runs/default",
                        help="an exported final/ directory, a checkpoint, or a run's out_dir (default: runs/default)")
    parser.add_argument("--out", default="shapes.png", help="the PNG to write (default: shapes.png)")
    parser.add_argument("--n", type=int, default=8, help="images, one row each (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="the images' seed; the same seed, the same images "
                                                            "(default: 0)")
    parser.add_argument("--scale", type=int, default=4, help="pixels per image pixel in the PNG (default: 4)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    notices: list[str] = []
    try:
        args = parser.parse_args(argv)
        for flag, value, ok, allowed in (("--n", args.n, 1 <= args.n <= 256, "between 1 and 256"),
                                         ("--scale", args.scale, 1 <= args.scale <= 16, "between 1 and 16"),
                                         ("--seed", args.seed, args.seed >= 0, ">= 0")):
            if not ok:
                parser.error(f"{flag} must be {allowed}, got {value}")
        out = Path(args.out)
        if not out.parent.is_dir():
            parser.error(f"--out {args.out}: no directory {out.parent}")
        if any((out.parent / name).exists() for name in ("meta.json", "config.json", "model.safetensors")):
            parser.error(f"--out {args.out}: inside a checkpoint or an export; give a path outside it")
        if out.exists() and (not out.is_file() or out.read_bytes()[:8] != PNG_MAGIC):
            parser.error(f"--out {args.out}: exists and is not a PNG; give a new file name")
        model, source = load_model(args.path, device_arg(args.device), notices)
    except (UsageError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join([*notices, f"sample: {source}"]), file=sys.stderr)
    images, masks, pred = segment(model, args.n, args.seed)
    try:
        out.write_bytes(png_bytes(grid(images, masks, pred, args.scale)))
    except OSError as e:
        print(f"error: --out {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return write_status(e)  # a read-only folder: 2; a full disk: 1
    print(f"{out}: {args.n} images (input | truth | prediction), mean Dice {mean_dice(masks, pred):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
