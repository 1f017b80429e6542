"""Shared test set-up: offline, a private HF_HOME, and a tiny model so every run takes seconds on a CPU."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# datasets reads HF_HOME at import: set it before anything imports datasets
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# auto's timings go to a cache of the test session's own, not the user's
os.environ.setdefault("AMPTPL_CACHE_DIR", tempfile.mkdtemp(prefix="amptpl-cache-"))

# The real config, shrunk: a tiny model on a small slice of the default corpus.
TINY = [
    "model.d_model=32", "model.n_layer=1", "model.n_head=2", "data.seq_len=32", "data.max_bytes=150000",
    "train.batch_size=8", "train.warmup_steps=2", "eval.batches=2", "log.every=2", "log.live=false",
    "amp.auto.measure=false",  # auto by the hardware rule: the same pick in every test (test_autopick times it)
]


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long run writing into a fresh out_dir."""
    return [*TINY, f"out_dir={tmp_path / 'run'}"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    """Environment for training in a subprocess: the package importable without install, offline."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process runs share Accelerate's singletons; start every test from a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
