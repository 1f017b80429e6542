"""The example's config sections: ``data`` and ``model`` (the byte LM), their checks, and what a resume must keep.
Standard library only (``config.py`` imports it before torch); field comments and class docstrings are ``--help``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """The text the model learns, cut into byte blocks of seq_len + 1."""

    files: list[str] = field(default_factory=list)  # local text files or globs; empty = Python's stdlib sources
    hub_name: str = ""  # a datasets hub name, for users with a network; never the default
    text_column: str = "text"  # the column holding the text (data.hub_name only)
    seq_len: int = 128  # bytes of context per block
    max_bytes: int = 3_000_000  # cap on the default corpus; 0 = no cap
    val_fraction: float = 0.05  # the last blocks held out for evaluation
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    """The small byte-level transformer."""

    d_model: int = 192  # width of the residual stream
    n_layer: int = 4  # transformer blocks
    n_head: int = 6  # attention heads; must divide d_model
    dropout: float = 0.0  # dropout probability in [0, 1)


# Keys a checkpoint cannot be resumed under when they change: the weights would not load (model.*), or the run
# would silently become another experiment (other data, another split). An entry names a key or a whole section.
RESUME_INCOMPATIBLE = ("model", "data.seq_len", "data.files", "data.hub_name", "data.text_column", "data.max_bytes",
                       "data.val_fraction")

# The tests' seconds-long size: a tiny model on a small slice of the corpus (the core's tests use it too).
TINY = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "data.seq_len=32", "data.max_bytes=150000"]
# A model wide enough for `bench` to show what a precision gains (bench --help, the README).
WIDE = ["model.d_model=384", "model.n_head=6"]


def validate(cfg: Any, need: Callable[[bool, str, str, Any], None]) -> None:
    """Check the example's ranges; ``need(ok, key, allowed, value)`` raises the config's one-line error."""
    d = cfg.data
    need(d.seq_len >= 2, "data.seq_len", ">= 2", d.seq_len)
    need(d.max_bytes >= 0, "data.max_bytes", ">= 0", d.max_bytes)
    need(0 < d.val_fraction < 1, "data.val_fraction", "in (0, 1)", d.val_fraction)
    need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    m = cfg.model
    need(m.d_model >= 1 and m.n_head >= 1 and m.d_model % m.n_head == 0, "model.n_head",
         f"a divisor of model.d_model ({m.d_model})", m.n_head)
    need(m.n_layer >= 1, "model.n_layer", ">= 1", m.n_layer)
    need(0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
