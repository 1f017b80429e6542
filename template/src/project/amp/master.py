"""``bf16-true``: bf16 weights, activations and gradients, with float32 master weights that keep every update."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load_state_dict

from .hooks import Feature
from .precision import PrecisionError, cast_floats

Pair = tuple[torch.nn.Parameter, torch.nn.Parameter]  # (the model's bf16 parameter, its float32 master)


class MasterWeights(Feature):
    """Float32 master weights for a model stored in bf16 (``bf16-true``)."""

    name = "master"

    @classmethod
    def make(cls, hooks: Any) -> MasterWeights | None:
        return cls(hooks) if hooks.resolution.weights_dtype is not None else None

    def __init__(self, hooks: Any):
        super().__init__(hooks)
        self.dtype = hooks.resolution.weights_dtype
        self.pairs: list[Pair] = []
        self._masters: dict[int, torch.nn.Parameter] = {}  # id(bf16 param) -> its master
        self._by_opt: dict[int, list[Pair]] = {}  # id(optimizer) -> the pairs it updates

    def before_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        engine = str(self.hooks.accelerator.distributed_type)
        if any(e in engine for e in ("FSDP", "DEEPSPEED", "MEGATRON")):
            raise PrecisionError(f"precision bf16-true runs on one process or under DDP; under {engine.split('.')[-1]} "
                                 "use bf16, whose engine keeps float32 master weights itself")
        for model in models:
            fp32_parts = [m for m in model.modules() if getattr(m, "_amp_fp32", False)]
            keep = {id(t) for m in fp32_parts for t in (*m.parameters(), *m.buffers())}
            with torch.no_grad():
                for p in model.parameters():
                    if id(p) not in keep and p.is_floating_point() and id(p) not in self._masters:
                        self._masters[id(p)] = master = torch.nn.Parameter(p.detach().clone().float(),
                                                                           requires_grad=p.requires_grad)
                        p.data = p.data.to(self.dtype)
                        self.pairs.append((p, master))
                for b in model.buffers():
                    if id(b) not in keep and b.is_floating_point():
                        b.data = b.data.to(self.dtype)
            for m in fp32_parts:
                m._amp_cast_back = self.dtype  # its output goes on to bf16 modules
        for opt in optimizers:  # the optimizer updates the masters; an optimizer that stepped keeps its state, float32
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    if (master := self._masters.get(id(p))) is not None:
                        group["params"][i] = master
                        if p in opt.state:
                            opt.state[master] = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() and
                                                 v.dim() else v for k, v in opt.state.pop(p).items()}
            mine = {id(m) for g in opt.param_groups for m in g["params"]}
            self._by_opt[id(opt)] = [(p, m) for p, m in self.pairs if id(m) in mine]

    def after_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        """``prepare`` moved the model: each master (and its optimizer state) goes to its parameter's device."""
        moved = {}
        for p, m in self.pairs:
            if m.device != p.device:
                m.data, moved[id(m)] = m.data.to(p.device), p.device
        for opt in optimizers:
            for m, state in getattr(opt, "optimizer", opt).state.items():
                for k, v in state.items() if id(m) in moved else ():
                    state[k] = v.to(moved[id(m)]) if torch.is_tensor(v) and v.dim() else v

    def pairs_of(self, opt: Any) -> list[Pair]:
        return self._by_opt.get(id(opt), [])

    def before_forward(self, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return cast_floats(args, self.dtype), cast_floats(kwargs, self.dtype)

    def after_forward(self, out: Any) -> Any:
        return cast_floats(out, torch.float32)

    def before_inner_step(self, opt: Any) -> None:
        for p, m in self.pairs_of(opt):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)

    def after_inner_step(self, opt: Any) -> None:
        self.round_into_model(self.pairs_of(opt))

    def after_zero_grad(self, opt: Any, set_to_none: bool) -> None:
        for p, _ in self.pairs_of(opt):
            p.grad = None if set_to_none or p.grad is None else p.grad.zero_()

    def round_into_model(self, pairs: list[Pair] | None = None) -> None:
        with torch.no_grad():
            for p, m in self.pairs if pairs is None else pairs:
                p.copy_(m)  # round to nearest

    def _by_storage(self) -> dict[int, torch.nn.Parameter]:
        return {p.data_ptr(): m for p, m in self.pairs}

    def on_save(self, weights: list[dict[str, Any]]) -> None:
        """In the save-state hook: the masters replace the bf16 weights, bf16 buffers go float32 (exactly)."""
        masters = self._by_storage()
        for state in weights:
            for key, value in list(state.items()):
                if torch.is_tensor(value) and (value.data_ptr() in masters or value.dtype == self.dtype):
                    state[key] = masters[value.data_ptr()].detach() if value.data_ptr() in masters else value.float()

    def on_load(self, path: str | Path, models: list[torch.nn.Module]) -> None:
        """After ``load_state``: the masters from the checkpoint's (float32) weights, the model rounded from them."""
        masters = self._by_storage()
        for i, model in enumerate(models):
            suffix = "" if i == 0 else f"_{i}"
            file = next((Path(path) / n for n in (f"model{suffix}.safetensors", f"pytorch_model{suffix}.bin")
                         if (Path(path) / n).is_file()), None)
            current = model.state_dict()
            with torch.no_grad():
                for key, value in (load_state_dict(str(file)) if file else {}).items():  # none for sharded weights
                    if (now := current.get(key)) is not None and now.data_ptr() in masters:
                        masters[now.data_ptr()].copy_(value)
        self.round_into_model()

    def float_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A float32 copy of ``module`` (a plain module sharing the model's parameters) with the master weights."""
        masters = self._by_storage()
        clone = copy.deepcopy(module).float()
        with torch.no_grad():
            for (_, p), (_, q) in zip(module.named_parameters(), clone.named_parameters(), strict=True):
                if p.data_ptr() in masters:
                    q.copy_(masters[p.data_ptr()])
        for m in clone.modules():
            m.__dict__.pop("_amp_cast_back", None)
        return clone
