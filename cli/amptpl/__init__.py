"""amptpl: scaffold a mixed-precision training project on HuggingFace Accelerate.

The CLI (``amptpl new | run | add``) is a thin layer over small library modules: ``render``, ``add``,
``runner`` and ``resources``. None of them imports torch, so scaffolding stays fast.
"""

# The one version: hatch reads it for the wheel, a release is the tag v + it (.github/workflows/release.yml), and
# the AMP core carries the same in template/src/project/amp/__init__.py.
__version__ = "0.1.0"
