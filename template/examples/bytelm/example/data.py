"""The byte LM's data: this Python's stdlib sources, ``data.files`` or ``data.hub_name`` through ``datasets``, cut into
blocks of ``seq_len + 1`` bytes, the last ``val_fraction`` held out; bad settings: a one-line :class:`DataError`."""

import codecs
import contextlib
import glob
import os
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import DataError


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
        path = os.path.expanduser(pat)
        if os.path.isdir(path):
            raise DataError(f"data.files: {pat!r} is a directory; name files or a glob, e.g. '{pat.rstrip('/')}/**/*.txt'")
        hits = sorted(h for h in glob.glob(path, recursive=True) if os.path.isfile(h))
        if not hits:
            raise DataError(f"data.files: {pat!r} matches no file")
        files += [h for h in hits if h not in files]
    return files


def check_text_file(path: str, head: int = 8192) -> None:
    """Refuse a file that is not UTF-8 text (a NUL byte, or invalid UTF-8) in its first ``head`` bytes (-1: all)."""
    try:
        with open(path, "rb") as f:
            chunk = f.read(head)
    except OSError as e:
        raise DataError(f"data.files: cannot read {path}: {e.strerror or e}") from None
    if b"\0" in chunk:
        raise DataError(f"data.files: {path} is a binary file (NUL byte at offset {chunk.index(0)}), not UTF-8 text")
    try:
        # a multi-byte character cut by the end of the chunk is not an error, one cut by the end of the file is
        codecs.getincrementaldecoder("utf-8")().decode(chunk, final=head < 0 or len(chunk) < head)
    except UnicodeDecodeError as e:
        raise DataError(f"data.files: {path} is not UTF-8 text (byte 0x{chunk[e.start]:02x} at offset {e.start}); "
                        "convert it to UTF-8") from None


# Where the text came from (the key a "too little data" line names) and how to get more of it.
MORE_TEXT = {"data.files": "add text", "data.max_bytes": "raise data.max_bytes (0 = no cap)",
             "data.hub_name": "a larger dataset"}


def source_key(files: list[str], hub_name: str) -> str:
    """The key that chose the text: ``data.hub_name``, ``data.files``, or ``data.max_bytes`` (the default corpus)."""
    return "data.hub_name" if hub_name else "data.files" if files else "data.max_bytes"


def check_enough(n_train_blocks: int, batch_size: int, num_processes: int, source: str = "data.files") -> None:
    """Refuse a training split under one global batch: the loader drops it, the loop would wait forever for one."""
    need = batch_size * num_processes
    if n_train_blocks < need:
        raise DataError(f"{source}: only {n_train_blocks} training blocks, fewer than one batch of {need} "
                        f"(train.batch_size={batch_size} x {num_processes} process{'es' if num_processes != 1 else ''}); "
                        f"{MORE_TEXT[source]}, or lower train.batch_size or data.seq_len")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What ``load_dataset`` raises when the hub cannot be reached (offline mode included)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    with contextlib.suppress(ImportError):  # huggingface_hub uses requests or httpx, by version
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.TransportError)
    return tuple(errors)


def _load_raw(files: list[str], hub_name: str):
    """``datasets.load_dataset`` for local text files or a hub name, its failures as one-line DataErrors."""
    import datasets
    from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

    if not hub_name:
        for path in files:
            check_text_file(path)
        quiet = not datasets.are_progress_bars_disabled()
        if quiet:  # local files: no "Downloading data" bar for a copy from disk (offline runs included)
            datasets.disable_progress_bars()
        try:
            return datasets.load_dataset("text", data_files={"train": files}, sample_by="document", split="train")
        except DatasetGenerationError as e:
            cause = e.__cause__ or e.__context__ or e
            if isinstance(cause, UnicodeDecodeError):  # past the checked head of some file: find which one
                for path in files:
                    check_text_file(path, head=-1)
            raise DataError(f"data.files: datasets could not read the files ({type(cause).__name__}: "
                            f"{' '.join(str(cause).split())[:160]})") from None
        finally:
            if quiet:
                datasets.enable_progress_bars()
    try:
        return datasets.load_dataset(hub_name, split="train")
    except _network_errors() as e:
        offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = ("no cached copy was found while offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" if offline
               else f"the hub could not be reached ({type(e).__name__})")
        raise DataError(f"data.hub_name: {hub_name!r} needs a network or a local cache, and {why}; "
                        "use data.files for local text") from None
    except DatasetNotFoundError:
        raise DataError(f"data.hub_name: {hub_name!r} was not found on the hub (or needs a login); "
                        "check the name, or use data.files for local text") from None
    except DatasetGenerationError as e:
        raise DataError(f"data.hub_name: {hub_name!r} could not be prepared ({type(e.__cause__ or e).__name__}); "
                        "see the datasets documentation for this dataset") from None


def _to_blocks(batch: dict, block: int, column: str) -> dict:
    data = "\n".join(batch[column]).encode("utf-8", errors="replace")
    return {"input_ids": [list(data[i : i + block]) for i in range(0, len(data) - block + 1, block)]}


def load_splits(files: list[str], hub_name: str, text_column: str, seq_len: int, val_fraction: float, source: str = ""):
    """(train, validation) datasets of byte blocks as torch tensors; ``source``: the key named if the text is short."""
    source = source or source_key(files, hub_name)
    import datasets

    raw = _load_raw(files, hub_name)
    text_column = text_column if hub_name else "text"  # local files: the text loader's one column
    if text_column not in raw.column_names:
        raise DataError(f"data.text_column: {text_column!r} not in the dataset's columns {raw.column_names}")
    blocks = raw.map(_to_blocks, batched=True, batch_size=64, remove_columns=raw.column_names,
                     fn_kwargs={"block": seq_len + 1, "column": text_column}, desc="bytes -> blocks",
                     features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint8"))}))
    n_train = len(blocks) - max(1, int(len(blocks) * val_fraction))
    if n_train < 1:
        raise DataError(f"{source}: only {len(blocks)} blocks of {seq_len + 1} bytes, none left for training after "
                        f"data.val_fraction={val_fraction}; {MORE_TEXT[source]} or lower data.seq_len")
    train, val = blocks.select(range(n_train)), blocks.select(range(n_train, len(blocks)))
    return train.with_format("torch"), val.with_format("torch")


def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows]).long()
    return ids[:, :-1], ids[:, 1:]


def make_loader(ds, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch (``set_epoch``), so resume is exact."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
