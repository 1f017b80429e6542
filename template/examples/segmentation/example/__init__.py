"""The example this project trains, a small 2-D U-Net that segments synthetic shapes: the one part to replace for
your own model and data (README: "Make it yours"). A batch is ``(images, masks)``; nothing heavy is imported here."""

from typing import Any

from .config import RESUME_INCOMPATIBLE, TINY, WIDE, DataConfig, ModelConfig, validate

NAME = "segmentation"
TITLE = "ShapesUNet"  # the exported model's name (its model card's title)
# What eval_rows returns per sample, in order: the evaluate module's inputs (metrics.FIELDS), summed per batch.
EVAL_FIELDS = ("inter_circle", "pred_circle", "true_circle", "inter_square", "pred_square", "true_square",
               "inter_triangle", "pred_triangle", "true_triangle", "correct", "pixels", "nll_sum")


class DataError(ValueError):
    """Bad data settings; the message is one line naming the key (exit 2)."""


def build_data(cfg: Any, accelerator: Any) -> tuple[Any, Any, str]:
    """(train_loader, val_loader, the "data:" line) over shape images drawn from ``data.seed`` (the same on every
    process); refuses fewer training images than one global batch."""
    from . import data

    d = cfg.data
    data.check_enough(d.num_train, cfg.train.batch_size, accelerator.num_processes)
    train_ds, val_ds = data.make_splits(d.num_train, d.num_val, d.image_size, d.max_shapes, d.noise, d.seed)
    train_loader = data.make_loader(train_ds, cfg.train.batch_size, True, cfg.seed, d.num_workers)
    val_loader = data.make_loader(val_ds, cfg.train.batch_size, False, cfg.seed, d.num_workers)
    return train_loader, val_loader, (f"{d.num_train} train / {d.num_val} val images of {d.image_size}x"
                                      f"{d.image_size}, 1-{d.max_shapes} shapes each (data.seed {d.seed})")


def build_model(cfg: Any) -> Any:
    """A freshly initialised model from the config (the loop keeps ``amp.fp32_modules`` in float32 afterwards)."""
    return model_class()(**model_args({"data": vars(cfg.data), "model": vars(cfg.model)}))


def loss(model: Any, batch: Any) -> Any:
    """The training loss of one batch: cross-entropy + soft Dice, in float32 whatever the model's output dtype."""
    from .model import dice_ce_loss

    x, y = batch
    return dice_ce_loss(model(x), y)  # a prepared model autocasts its own forward


def eval_rows(model: Any, batch: Any) -> Any:
    """Per sample, the sums named by :data:`EVAL_FIELDS` (float64, shape (batch, 12)); the forward runs under the
    caller's autocast, the loss in float32."""
    import torch
    import torch.nn.functional as F

    x, y = batch
    logits = model(x)
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        nll = F.cross_entropy(logits, y, reduction="none").double().sum((1, 2))
        pred = logits.argmax(1)
        cols = []
        for c in range(1, logits.shape[1]):
            p, t = pred == c, y == c
            cols += [(p & t).sum((1, 2)), p.sum((1, 2)), t.sum((1, 2))]
        cols += [(pred == y).sum((1, 2)), torch.full_like(cols[0], y[0].numel())]
        return torch.cat([torch.stack(cols, 1).double(), nll[:, None]], 1)


def load_metric() -> Any:
    """The evaluate module fed per-batch sums of :data:`EVAL_FIELDS` (Dice, IoU, pixel accuracy, loss)."""
    from .metrics import load_metric as load

    return load()


def model_class() -> type:
    """The model class, a ``PyTorchModelHubMixin`` built from :func:`model_args` of a checkpoint's config."""
    from .model import ShapesUNet

    return ShapesUNet


def model_args(config: dict) -> dict:
    """The model's constructor arguments from a saved config (``meta.json["config"]``); ValueError naming the key."""
    model, data = config.get("model"), config.get("data")
    if not isinstance(model, dict) or not isinstance(data, dict):
        raise ValueError("has no config.model / config.data (not written by this project?)")
    args = {"image_size": data.get("image_size"), **{k: model.get(k) for k in ("base_channels", "depth", "dropout")}}
    for key, value in args.items():
        name = f"config.{'data' if key == 'image_size' else 'model'}.{key}"
        if key == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    step = 2 ** (args["depth"] - 1)
    if args["image_size"] % step:
        raise ValueError(f"config.data.image_size {args['image_size']} is not a multiple of {step} "
                         f"(2**(model.depth - 1), depth {args['depth']})")
    return args


def card(model: Any, package: str) -> tuple[list[tuple[str, str]], str]:
    """The exported model card's rows about the model, and its "Use" section (Markdown)."""
    cfg = model._hub_mixin_config or {}
    depth, base = cfg.get("depth"), cfg.get("base_channels")
    widths = ", ".join(str(base * 2**i) for i in range(depth)) if isinstance(depth, int) and isinstance(base, int) \
        else "?"
    rows = [("what", "2-D U-Net (conv-BatchNorm-ReLU) labelling each pixel: background, circle, square, triangle"),
            ("input", f"1-channel float images, trained on {cfg.get('image_size')}x{cfg.get('image_size')}"),
            ("resolution levels", f"{depth} (channels {widths})")]
    use = f"""```python
import torch
from {package}.example.data import draw_shapes
from {package}.example.model import ShapesUNet

model = ShapesUNet.from_pretrained("path/to/this/folder")   # config.json holds the constructor arguments
images, masks = draw_shapes(8, model.image_size, seed=1)
with torch.no_grad():
    labels = model(images).argmax(1)   # (8, H, W): 0 background, 1 circle, 2 square, 3 triangle
```

or `python -m {package}.sample path/to/this/folder --out shapes.png` (input | truth | prediction)."""
    return rows, use


def loss_unit(val_loss: float) -> str:
    """How the card shows the validation loss."""
    return f"{val_loss:.4f} nats/pixel (cross-entropy)"


__all__ = ["EVAL_FIELDS", "NAME", "RESUME_INCOMPATIBLE", "TINY", "TITLE", "WIDE", "DataConfig", "DataError",
           "ModelConfig", "build_data", "build_model", "card", "eval_rows", "load_metric", "loss", "loss_unit",
           "model_args", "model_class", "validate"]
