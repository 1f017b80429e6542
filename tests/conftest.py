"""Shared by the tests that render a project and train it in subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# amp.precision=auto caches what it timed: the runs of this test session use a cache of their own, not the user's
os.environ.setdefault("AMPTPL_CACHE_DIR", tempfile.mkdtemp(prefix="amptpl-cache-"))


def render(parent: Path, name: str, *options: str) -> Path:
    """``amptpl new NAME --dir PARENT [OPTIONS]`` through the installed package; returns the project folder."""
    subprocess.run([sys.executable, "-m", "amptpl", "new", name, "--dir", str(parent), *options], check=True,
                   capture_output=True, text=True)
    return parent / name


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The user's environment, offline, with a private HF_HOME and nothing of this checkout on PYTHONPATH."""
    e = dict(os.environ)
    e.update(HF_HOME=str(tmp_path_factory.mktemp("hf-home")), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             PYTHONUNBUFFERED="1")
    e.pop("PYTHONPATH", None)
    return e
