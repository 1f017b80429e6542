"""Where the template and the presets live: inside the installed ``amptpl`` package.

The wheel carries the repo-root folders ``template/`` and ``configs/`` as ``amptpl/template/`` and
``amptpl/configs/`` (hatch force-include), so they are found with ``importlib.resources`` wherever amptpl is
installed, never relative to a source checkout. Running from a checkout without installing is not supported:
the error says to ``pip install .``.

For development only, ``AMPTPL_TEMPLATE_ROOT`` / ``AMPTPL_CONFIGS_ROOT`` point at another folder.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AmptplError

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; importlib.abc.Traversable is going away
    from importlib.resources.abc import Traversable

TEMPLATE_ENV = "AMPTPL_TEMPLATE_ROOT"
CONFIGS_ENV = "AMPTPL_CONFIGS_ROOT"


def _resource(name: str, env: str) -> Traversable:
    override = os.environ.get(env)
    if override:
        root: Traversable = Path(override)
        if not root.is_dir():
            raise AmptplError(
                f"{env}={override} is not a directory; unset it or point it at a template folder"
            )
        return root
    root = files("amptpl") / name
    if not root.is_dir():
        raise AmptplError(
            f"the amptpl package has no {name}/ folder (looked in {files('amptpl')}); "
            "install amptpl as a wheel with `pip install .` from the repo root"
        )
    return root


def template_root() -> Traversable:
    """The project template (``amptpl/template`` in the installed package)."""
    return _resource("template", TEMPLATE_ENV)


def configs_root() -> Traversable:
    """The presets copied into new projects as ``configs/`` (``amptpl/configs`` in the installed package)."""
    return _resource("configs", CONFIGS_ENV)
