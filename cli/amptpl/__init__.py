"""amptpl: scaffold a mixed-precision training project on HuggingFace Accelerate.

The CLI (``amptpl new | run | add``) is a thin layer over small library modules: ``render``, ``add``,
``runner`` and ``resources``. None of them imports torch, so scaffolding stays fast.
"""

__version__ = "0.1.0"
