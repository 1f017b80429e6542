"""Data for the default example: bytes of real text, loaded with ``datasets``, no download.

By default the corpus is the Python standard library's own source files, which exist on every machine
that runs this project. ``data.files`` points it at your own text files (globs allowed);
``data.hub_name`` loads a dataset from the Hugging Face hub for users with a network.

The text is concatenated, encoded as UTF-8 bytes and cut into blocks of ``seq_len + 1`` bytes; the last
``val_fraction`` of the blocks is held out for evaluation (split by position, as nanoGPT does).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import DataLoader


class DataError(ValueError):
    """Bad data settings; the message is one line naming the key or path."""


def stdlib_files(max_bytes: int) -> list[str]:
    """The top-level ``*.py`` files of this Python's standard library, sorted, capped at ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if max_bytes and total + size > max_bytes and files:
            continue
        files.append(str(path))
        total += size
    if not files:
        raise DataError(f"data.files: no Python sources found under {root}; set data.files to your own text")
    return files


def resolve_files(patterns: list[str], max_bytes: int) -> list[str]:
    """Expand ``data.files`` globs (or fall back to the stdlib corpus); every pattern must match."""
    if not patterns:
        return stdlib_files(max_bytes)
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise DataError(f"data.files: {pat!r} matches no file")
        files += [h for h in hits if h not in files]
    return files


def _to_blocks(batch: dict, block: int, column: str) -> dict:
    data = "\n".join(batch[column]).encode("utf-8", errors="replace")
    n = len(data) // block
    return {"input_ids": [list(data[i * block : (i + 1) * block]) for i in range(n)]}


def load_splits(files: list[str], hub_name: str, text_column: str, seq_len: int, val_fraction: float):
    """Return (train, validation) datasets of byte blocks, formatted as torch tensors."""
    import datasets

    if hub_name:
        raw = datasets.load_dataset(hub_name, split="train")
    else:
        raw = datasets.load_dataset("text", data_files={"train": files}, sample_by="document", split="train")
        text_column = "text"
    if text_column not in raw.column_names:
        raise DataError(f"data.text_column: {text_column!r} not in the dataset's columns {raw.column_names}")
    blocks = raw.map(
        _to_blocks,
        batched=True,
        batch_size=64,
        remove_columns=raw.column_names,
        fn_kwargs={"block": seq_len + 1, "column": text_column},
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint8"))}),
        desc="bytes -> blocks",
    )
    n_val = max(1, int(len(blocks) * val_fraction))
    if len(blocks) - n_val < 1:
        raise DataError(f"data: only {len(blocks)} blocks of {seq_len + 1} bytes; add text or lower data.seq_len")
    train = blocks.select(range(len(blocks) - n_val)).with_format("torch")
    val = blocks.select(range(len(blocks) - n_val, len(blocks))).with_format("torch")
    return train, val


def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows]).long()
    return ids[:, :-1], ids[:, 1:]


def make_loader(ds, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch (``set_epoch``), so resume is exact."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        collate_fn=collate,
        generator=g,
        num_workers=num_workers,
    )
