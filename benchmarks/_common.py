"""What the benchmark scripts share: the machine line, the template's import path, a plain-text table."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def template_src(example: str = "bytelm") -> Path:
    """A folder holding the template's package, unrendered, as ``project`` with ``example``'s part joined in as
    ``project/example`` (what a rendered project has as ``src/PACKAGE``); rebuilt under build/ on each call."""
    root = REPO / "build" / f"template-{example}"
    shutil.rmtree(root, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "template" / "src" / "project", root / "project", ignore=ignore)
    shutil.copytree(REPO / "template" / "examples" / example / "example", root / "project" / "example", ignore=ignore)
    return root


TEMPLATE_SRC = template_src()  # the template's package with the default example: import project
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_line() -> str:
    """``<model name>, N cores; avx2=yes ...``: the CPU and the flags that decide bf16 speed."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == (platform.processor() or "unknown CPU"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in FLAGS)
    return f"{name}, {os.cpu_count()} cores; {shown}"


def template_env() -> dict[str, str]:
    """The environment of a child that imports the template as ``project``, offline."""
    path = os.pathsep.join(filter(None, [str(TEMPLATE_SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to width, the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])
