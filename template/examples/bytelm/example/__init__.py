"""The example this project trains, a small byte-level language model on text that needs no download: the one part
to replace for your own model and data (README: "Make it yours"). Nothing heavy is imported here."""

import math
from typing import Any

from .config import RESUME_INCOMPATIBLE, TINY, WIDE, DataConfig, ModelConfig, validate

NAME = "bytelm"
TITLE = "ByteLM"  # the exported model's name (its model card's title)
# What eval_rows returns per sample, in order: the evaluate module's inputs (metrics.py), summed per batch.
EVAL_FIELDS = ("correct", "count", "nll_sum")


class DataError(ValueError):
    """Bad data settings; the message is one line naming the key or path (exit 2)."""


def build_data(cfg: Any, accelerator: Any) -> tuple[Any, Any, str]:
    """(train_loader, val_loader, the "data:" line) over byte blocks; refuses fewer blocks than one global batch."""
    from . import data

    with accelerator.main_process_first():
        files = [] if cfg.data.hub_name else data.resolve_files(cfg.data.files, cfg.data.max_bytes)
        source = data.source_key(cfg.data.files, cfg.data.hub_name)
        train_ds, val_ds = data.load_splits(files, cfg.data.hub_name, cfg.data.text_column, cfg.data.seq_len,
                                            cfg.data.val_fraction, source)
    data.check_enough(len(train_ds), cfg.train.batch_size, accelerator.num_processes, source)
    train_loader = data.make_loader(train_ds, cfg.train.batch_size, True, cfg.seed, cfg.data.num_workers)
    val_loader = data.make_loader(val_ds, cfg.train.batch_size, False, cfg.seed, cfg.data.num_workers)
    return train_loader, val_loader, f"{len(train_ds)} train / {len(val_ds)} val blocks of {cfg.data.seq_len + 1} bytes"


def build_model(cfg: Any) -> Any:
    """A freshly initialised model from the config (the loop keeps ``amp.fp32_modules`` in float32 afterwards)."""
    return model_class()(**model_args({"data": vars(cfg.data), "model": vars(cfg.model)}))


def loss(model: Any, batch: Any) -> Any:
    """The training loss of one batch, in float32 whatever the autocast dtype of the model's output."""
    from .model import lm_loss

    x, y = batch
    return lm_loss(model(x), y)


def eval_rows(model: Any, batch: Any) -> Any:
    """Per sample, the sums named by :data:`EVAL_FIELDS` (float64, shape (batch, 3)), the loss in float32."""
    import torch
    import torch.nn.functional as F

    x, y = batch
    logits = model(x)
    nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
    return torch.stack([(logits.argmax(-1) == y).sum(1).double(),
                        torch.full_like(nll[:, 0], y.shape[1], dtype=torch.float64), nll.double().sum(1)], 1)


def load_metric() -> Any:
    """The evaluate module fed per-batch sums of :data:`EVAL_FIELDS` (accuracy, loss, perplexity)."""
    from .metrics import load_metric as load

    return load()


def model_class() -> type:
    """The model class, a ``PyTorchModelHubMixin`` built from :func:`model_args` of a checkpoint's config."""
    from .model import ByteLM

    return ByteLM


def model_args(config: dict) -> dict:
    """The model's constructor arguments from a saved config (``meta.json["config"]``); ValueError naming the key."""
    model, data = config.get("model"), config.get("data")
    if not isinstance(model, dict) or not isinstance(data, dict):
        raise ValueError("has no config.model / config.data (not written by this project?)")
    args = {"seq_len": data.get("seq_len"), **{k: model.get(k) for k in ("d_model", "n_layer", "n_head", "dropout")}}
    for key, value in args.items():
        name = f"config.{'data' if key == 'seq_len' else 'model'}.{key}"
        if key == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if args["d_model"] % args["n_head"]:
        raise ValueError(f"config.model.d_model {args['d_model']} is not a multiple of n_head {args['n_head']}")
    return args


def card(model: Any, package: str) -> tuple[list[tuple[str, str]], str]:
    """The exported model card's rows about the model, and its "Use" section (Markdown)."""
    cfg = model._hub_mixin_config or {}
    rows = [("what", "GPT-style decoder over raw bytes (vocabulary 256, no tokenizer)"),
            ("context", f"{cfg.get('seq_len')} bytes"),
            ("layers / width / heads", f"{cfg.get('n_layer')} / {cfg.get('d_model')} / {cfg.get('n_head')}")]
    use = f"""```python
import torch
from {package}.example.model import ByteLM

model = ByteLM.from_pretrained("path/to/this/folder")   # config.json holds the constructor arguments
out = model.generate(torch.tensor([list(b"def ")]), 200, temperature=0.8, top_k=50)
print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
```

or `python -m {package}.sample path/to/this/folder --prompt "def "`."""
    return rows, use


def loss_unit(val_loss: float) -> str:
    """How the card shows the validation loss."""
    return f"{val_loss:.4f} nats/byte (perplexity {math.exp(min(val_loss, 700)):.2f})"


__all__ = ["EVAL_FIELDS", "NAME", "RESUME_INCOMPATIBLE", "TINY", "TITLE", "WIDE", "DataConfig", "DataError",
           "ModelConfig", "build_data", "build_model", "card", "eval_rows", "load_metric", "loss", "loss_unit",
           "model_args", "model_class", "validate"]
