"""What precision each tensor has after the first optimizer step, against what the run declared: a mismatch (a
``model.to(bf16)`` under "bf16 mixed") is a warning, or :class:`AuditError` under ``audit="strict"`` (debugger.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..hooks import Feature
from ..settings import AUDIT_MODES as MODES


class AuditError(ValueError):
    """The tensors' precision contradicts the declared one (``audit="strict"``): one line naming them."""


def _name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Iterable[Any]) -> str:
    return ",".join(sorted({_name(d) for d in dtypes})) or "-"


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


class Audit(Feature):
    """Hooks for the first step (top-level module outputs, gradients at the optimizer step), then the table. A
    feature of the session (``hooks.py``); on its own: ``watch(models, optimizers)``, a step, ``finish()``."""

    name = "audit"

    @classmethod
    def make(cls, hooks: Any) -> Audit | None:
        deepspeed = "DEEPSPEED" in str(hooks.accelerator.distributed_type)  # its engine owns the weights' precision
        return None if hooks.settings.audit == "off" or deepspeed else cls(hooks.resolution.effective,
                                                                           hooks.settings.audit, hooks)

    def __init__(self, precision: str, mode: str = "warn", hooks: Any = None):
        super().__init__(hooks)
        if mode not in MODES:
            raise ValueError(f"audit must be one of {'|'.join(MODES)}, got {mode!r}")
        self.precision, self.mode = precision, mode
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[Any] = []
        self.outputs: dict[str, set[str]] = {}
        self.grads: dict[int, set[str]] = {}  # id(optimizer) -> gradient dtypes at its first step
        self.result: dict[str, Any] | None = None
        self._handles: list[Any] = []

    def after_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        if self.result is None:
            self.watch(models, optimizers)

    def at_step(self, loss: Any) -> None:
        """After the first optimizer step: the table, its lines, and the problems (an error under ``strict``)."""
        if self.result is not None:
            return
        scaler = self.hooks.accelerator.scaler
        problems = self.finish(scaler if scaler is not None and scaler.is_enabled() else None)
        for line in self.lines():
            self.hooks.say(line)
        if problems and self.mode == "strict":
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise AuditError(f"precision audit: {problems[0]}{more}")
        for line in problems:
            self.hooks.say(f"warning: precision audit: {line}", style="yellow")

    def meta(self) -> dict[str, Any]:
        return {"audit": self.result}

    def watch(self, models: Iterable[torch.nn.Module], optimizers: Iterable[Any]) -> None:
        for model in models:
            plain = getattr(model, "module", model)  # DDP's
            self.models.append(plain)
            for name, child in plain.named_children():
                self._handles.append(child.register_forward_hook(self._output(name)))
        for opt in optimizers:
            inner = getattr(opt, "optimizer", opt)
            self.optimizers.append(inner)
            if hasattr(inner, "register_step_pre_hook"):
                self._handles.append(inner.register_step_pre_hook(self._grads))

    def _output(self, name: str) -> Any:
        # a closure, not a bound method: a model deep-copied while it is watched must not copy the session
        def hook(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self.outputs.setdefault(name, set()).add(_name(out.dtype))

        return hook

    def _grads(self, opt: Any, args: Any, kwargs: Any) -> None:
        if id(opt) not in self.grads:
            self.grads[id(opt)] = {_name(p.grad.dtype) for g in opt.param_groups for p in g["params"]
                                   if p.grad is not None}

    def finish(self, scaler: Any = None) -> list[str]:
        """Remove the hooks, build the table (``self.result``) and return the problems found (one line each)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        want_weights = torch.bfloat16 if self.precision == "bf16-true" else torch.float32
        names = {id(p): n for m in self.models for n, p in m.named_parameters()}
        problems, groups = [], []
        for i, opt in enumerate(self.optimizers):
            for j, g in enumerate(opt.param_groups):
                params = [p for p in g["params"] if p.is_floating_point()]
                state = {k: v.dtype for p in params for k, v in opt.state.get(p, {}).items()
                         if torch.is_tensor(v) and v.is_floating_point() and v.dim()}
                groups.append({"group": f"{i}.{j}", "params": len(params), "storage": _names(p.dtype for p in params),
                               "grad": _names(self.grads.get(id(opt), set())) if j == 0 else "",
                               "state": ", ".join(f"{k} {_name(d)}" for k, d in sorted(state.items())) or "-"})
                low = [p for p in params if p.dtype != torch.float32]
                if low:
                    problems.append(f"optimizer {i} group {j} updates {len(low)} {_names(p.dtype for p in low)} "
                                    f"parameter(s) ({_few([names.get(id(p), '?') for p in low])}): {self.precision} "
                                    "keeps float32 master weights")
                bad_state = sorted(k for k, d in state.items() if d != torch.float32)
                if bad_state:
                    problems.append(f"optimizer {i} group {j} keeps {', '.join(bad_state)} in "
                                    f"{_names(state[k] for k in bad_state)}: {self.precision} keeps float32 "
                                    "optimizer state")
        fp32 = [(n, x) for m in self.models for n, x in m.named_modules() if getattr(x, "_amp_fp32", False)]
        kept = {id(p) for _, x in fp32 for p in x.parameters()}
        weights = [(n, p) for m in self.models for n, p in m.named_parameters()
                   if p.is_floating_point() and id(p) not in kept]
        wrong = [(n, p) for n, p in weights if p.dtype != want_weights]
        if wrong:
            problems.append(f"model parameter(s) {_few([n for n, _ in wrong])} ({len(wrong)} of {len(weights)}) are "
                            f"{_names(p.dtype for _, p in wrong)}: {self.precision} stores the model's weights in "
                            f"{_name(want_weights)}")
        tf32 = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
        self.result = {"precision": self.precision, "optimizer_groups": groups,
                       "model_weights": _names(p.dtype for _, p in weights),
                       "module_outputs": {n: _names(d) for n, d in self.outputs.items()},
                       "fp32_modules": [n for n, _ in fp32], "tf32": tf32,
                       "scaler": type(scaler).__name__ if scaler is not None else "none", "problems": problems}
        return problems

    def lines(self) -> list[str]:
        """The table as plain lines for the console."""
        r = self.result or {}
        out = [f"precision audit ({r.get('precision')}): model weights {r.get('model_weights')}; "
               f"scaler {r.get('scaler')}; tf32 matmul {r.get('tf32', {}).get('matmul')}; "
               f"fp32_modules {r.get('fp32_modules') or '-'}"]
        for g in r.get("optimizer_groups", []):
            grad = f", grads {g['grad']}" if g["grad"] else ""
            out.append(f"  optimizer group {g['group']}: {g['params']} params {g['storage']}{grad}; state {g['state']}")
        if r.get("module_outputs"):
            out.append("  outputs: " + ", ".join(f"{n} {d}" for n, d in r["module_outputs"].items()))
        return out
