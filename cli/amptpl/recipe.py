"""The integration recipe printed by ``amptpl add``: unified diffs between example scripts.

``recipes/`` holds two pairs of runnable scripts: a plain Accelerate script shaped like Accelerate's
``examples/nlp_example.py`` and a plain PyTorch loop, each next to the same script using the copied core
(``*_amp.py``). The printed diffs are computed from those files and nothing else, so what ``amptpl add``
prints is what the scripts run: tests/test_recipe.py applies the printed diff with ``patch`` and trains the
result. Editing a recipe means editing the ``*_amp.py`` script.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib.resources import files

from .errors import AmptplError

# The name the diff headers give the user's script: `patch -p1 YOUR_SCRIPT.py < recipe.diff` applies it.
SCRIPT = "train.py"


@dataclass(frozen=True)
class Recipe:
    """A plain script and the same script using the AMP core, both in ``amptpl/recipes/``."""

    heading: str
    plain: str
    amp: str


ACCELERATE = Recipe("Integrate with a plain Accelerate loop", "accelerate_example.py", "accelerate_example_amp.py")
PYTORCH = Recipe("Or, from a plain PyTorch loop", "pytorch_example.py", "pytorch_example_amp.py")
RECIPES = (ACCELERATE, PYTORCH)

# A loop written in steps, not epochs: the same calls, none of whose values it needs to read.
STEP_BASED = """\
A step-based loop makes the same calls and need not look at what they return (after a stop, with the state
saved, its next call ends the process with the stop's exit status):

    while amp.step < max_steps:
        for batch in amp.batches(train_dataloader):
            ...  # forward, accelerator.backward(loss), optimizer.step(), optimizer.zero_grad()
            amp.after_step(loss)
    if not amp.stop:  # work after the loop (a final eval, a save): only for a run that finished
        ...
    amp.close()
"""

POINTER = (
    "Each added line is explained in amp/__init__.py's docstring and in amptpl's docs, "
    "docs/copying-the-core.md (the contract with your loop, and each loop shape)."
)


def source(name: str) -> str:
    """The text of ``amptpl/recipes/NAME`` as installed."""
    entry = files("amptpl") / "recipes" / name
    if not entry.is_file():
        raise AmptplError(f"the amptpl package has no recipes/{name}; reinstall amptpl with `pip install .`")
    return entry.read_text(encoding="utf-8")


def diff(recipe: Recipe) -> str:
    """The unified diff from the plain script to the AMP one: ``a/train.py`` ``b/train.py``, 3 lines of context."""
    lines = difflib.unified_diff(
        source(recipe.plain).splitlines(keepends=True),
        source(recipe.amp).splitlines(keepends=True),
        fromfile=f"a/{SCRIPT}",
        tofile=f"b/{SCRIPT}",
        n=3,
    )
    return "".join(lines)


def added_lines(diff_text: str) -> list[str]:
    """The lines a diff adds, without their ``+`` (the ``+++`` header is not one)."""
    return [
        line[1:] for line in diff_text.splitlines() if line.startswith("+") and not line.startswith("+++")
    ]


def render() -> str:
    """Both recipes as printed: a heading with the number of lines added, the diff, then where to read more."""
    blocks = []
    for recipe in RECIPES:
        text = diff(recipe)
        n = len(added_lines(text))
        blocks.append(f"{recipe.heading} ({n} line{'s' if n != 1 else ''} added):\n{text}")
    return "\n".join(blocks) + "\n" + STEP_BASED + "\n" + POINTER + "\n"
