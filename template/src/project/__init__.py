"""A mixed-precision training project on HuggingFace Accelerate."""

__version__ = "0.1.0"
