"""``fp8``: the inner Linears as torchao's Float8Linear through Accelerate's torchao backend, bf16 autocast around
them; which Linears convert, and why each other one does not, decided here and said once."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib
import logging
from typing import Any

import torch

from .hooks import Feature
from .precision import PrecisionError

Row = tuple[str, torch.nn.Module, "str | None"]  # (name, Linear, why it stays in bf16; None: it runs in fp8)


def config(fp8: Any, emulate: bool) -> Any:
    """The recipe's ``Float8LinearConfig``, imported without torchao's notes on CUDA extensions a CPU build lacks.
    Not Accelerate's default, whose FSDP2 float8 all-gather makes weights its ``save_state`` cannot write ("invalid
    python storage", accelerate 1.16, torchao 0.18; tests/core/test_fp8.py tells when that changes). ``emulate`` (a
    CPU): fp8-rounded operands multiplied in float32, the CPU ``_scaled_mm``'s numbers in a fraction of its time."""
    quiet = {n: logging.getLogger(n).level for n in ("torchao", "torch.utils._pytree")}
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        cls = importlib.import_module("torchao.float8").Float8LinearConfig
    except ImportError:
        raise PrecisionError("precision fp8 needs torchao, which is not installed: pip install 'torchao>=0.18' (in a "
                             "generated project: pip install -e '.[torchao]')") from None
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    return dataclasses.replace(cls.from_recipe_name(fp8.recipe), emulate=emulate)


def gains_on_h100(recipe: str, n: int, k: int) -> bool:
    """Whether torchao's H100 tables show a Linear (``n`` out, ``k`` in features) faster in fp8 than in bf16: torchao
    0.18's ``_auto_filter_for_tensorwise``/``_rowwise`` thresholds, from github.com/pytorch/ao/tree/main/torchao/float8."""
    return n > 2048 and k > 1024 and not (n <= 4096 and k <= 2048) if recipe == "rowwise" else k > 4096 or n > 1024


def plan(model: torch.nn.Module, settings: Any) -> list[Row]:
    """Each Linear of ``model``, in order, and why it stays in bf16 (None where it runs in fp8)."""
    f = settings.fp8
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    fp32 = [n for n, m in model.named_modules() if getattr(m, "_amp_fp32", False)]
    return [(name, m, "fp32_modules" if any(name == k or name.startswith(f"{k}.") for k in fp32) else
             "fp8.skip" if any(fnmatch.fnmatchcase(name, p) for p in f.skip) else
             "the first Linear" if i == 0 and not f.first_last else
             "the last Linear" if i == len(linears) - 1 and not f.first_last else
             "a dimension not divisible by 16" if m.in_features % 16 or m.out_features % 16 else
             "too small to gain on an H100" if f.skip_small and not gains_on_h100(f.recipe, m.out_features,
                                                                                   m.in_features) else None)
            for i, (name, m) in enumerate(linears)]


def in_fp8(rows: list[Row], module: torch.nn.Module) -> bool:
    return any(m is module and why is None for _, m, why in rows)


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


class Fp8(Feature):
    """Accelerate's module filter for the conversion in ``prepare``, and the line that says what it did."""

    name = "fp8"

    @classmethod
    def make(cls, hooks: Any) -> Fp8 | None:
        return cls(hooks) if hooks.resolution.effective == "fp8" else None

    def __init__(self, hooks: Any):
        super().__init__(hooks)
        self.rows: list[Row] = []
        hooks.accelerator.ao_recipe_handler.module_filter_func = lambda module, fqn: in_fp8(self.rows, module)

    def before_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        self.rows = [row for model in models for row in plan(model, self.hooks.settings)] or self.rows

    def after_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        recipe, say = self.hooks.settings.fp8.recipe, self.hooks.say
        if models and not self.rows:  # no models: prepare(optimizer) after prepare(model), said then
            say("fp8: the model has no torch.nn.Linear, the one layer fp8 converts: all of it runs in bf16 autocast")
        elif models:
            fp8 = [n for model in models for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
            left = "".join(f"; in bf16 ({why}): {_few([n for n, _, w in self.rows if w == why])}"
                           for why in dict.fromkeys(w for _, _, w in self.rows if w))
            say(f"fp8: {len(fp8)} of {len(self.rows)} Linears run in fp8 ({recipe} scaling): {_few(fp8) or '-'}{left}")
            small = [m for _, m, why in self.rows if why is None and not gains_on_h100(recipe, m.out_features,
                                                                                        m.in_features)]
            if small:
                say(f"fp8: {len(small)} of them too small to gain on an H100 by torchao's tables (fp8.skip_small=true "
                    "leaves them in bf16)")

    def float_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``module`` with plain Linears for its Float8Linears, the same weights: ``eval.precision=fp32``."""
        clone = copy.deepcopy(module)
        for parent in list(clone.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "Float8Linear":
                    plain = torch.nn.Linear(child.in_features, child.out_features, child.bias is not None, "meta")
                    plain.weight, plain.bias = child.weight, child.bias
                    setattr(parent, name, plain)
        return clone
