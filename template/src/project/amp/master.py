"""``bf16-true``: weights, activations and gradients in bf16 without autocast, float32 master weights in the optimizer.

Pure bf16 training loses small updates: a bf16 weight has 8 significant bits, so an AdamW step smaller than half
its spacing (``lr`` 1e-4 on a weight of 0.5 is 1/20 of it) rounds back to the same value and is gone, step after
step (``benchmarks/lost_updates.py`` shows it). Two remedies are known: float32 master weights (the optimizer
updates a float32 copy, the model gets it rounded to bf16) and stochastic rounding of the bf16 update (unbiased
only on average). This core keeps master weights: no update is ever lost, any ``torch.optim`` optimizer works
unchanged with float32 state, and the run stays deterministic, so a resume is bitwise exact (stochastic rounding
would draw random numbers in every step). The cost is 4 bytes per parameter more than pure bf16.

:class:`MasterWeights` does it around a model and its optimizers, before ``accelerator.prepare``:

- the model's parameters and floating buffers become bf16 (modules kept in float32 by ``keep_in_fp32`` stay float32
  and hand bf16 on to the next module); its forward takes float inputs as bf16 and returns float outputs as float32,
  so the loss is computed in float32 as under autocast;
- each optimizer updates float32 copies of the bf16 parameters (its state is float32 too): at ``step()`` the bf16
  gradients are copied in, and after it the updated masters are rounded into the model;
- a checkpoint holds the float32 masters as the model's weights (like every other precision, so a resume across
  precisions loses nothing); :meth:`on_load` puts the float32 values back into the masters after a resume.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .hooks import Feature
from .precision import PrecisionError, cast_floats


class MasterWeights(Feature):
    """Float32 master weights for a model stored in bf16 (``bf16-true``); a feature of the session (``hooks.py``)."""

    name = "master"

    @classmethod
    def make(cls, hooks: Any) -> MasterWeights | None:
        dtype = hooks.resolution.weights_dtype
        return cls(hooks, dtype) if dtype is not None else None

    def __init__(self, hooks: Any, dtype: torch.dtype = torch.bfloat16):
        super().__init__(hooks)
        self.dtype = dtype
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (low-precision param, float32 master)
        self.models: list[torch.nn.Module] = []
        self._masters: dict[int, torch.nn.Parameter] = {}  # id(low-precision param) -> its master
        self._by_opt: dict[int, list[tuple[torch.nn.Parameter, torch.nn.Parameter]]] = {}  # id(optimizer) -> pairs

    # ------------------------------------------------------------------ set-up, before accelerator.prepare

    def before_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        engine = str(self.hooks.accelerator.distributed_type)
        if "FSDP" in engine or "DEEPSPEED" in engine or "MEGATRON" in engine:
            raise PrecisionError(f"precision bf16-true runs on one process or under DDP; under {engine.split('.')[-1]} "
                                 "use bf16, whose engine keeps float32 master weights itself")
        for model in models:
            self.attach(model)
        for opt in optimizers:
            self.take(opt)

    def attach(self, model: torch.nn.Module) -> None:
        """Store ``model`` in ``dtype``; each floating parameter gets a float32 master."""
        if any(m is model for m in self.models):
            return
        fp32_parts = [m for m in model.modules() if getattr(m, "_amp_fp32", False)]
        keep = {id(t) for m in fp32_parts for t in (*m.parameters(), *m.buffers())}
        with torch.no_grad():
            for p in model.parameters():
                if id(p) in keep or not p.is_floating_point() or id(p) in self._masters:
                    continue
                master = torch.nn.Parameter(p.detach().clone().float(), requires_grad=p.requires_grad)
                self._masters[id(p)] = master
                p.data = p.data.to(self.dtype)
                self.pairs.append((p, master))
            for b in model.buffers():
                if id(b) not in keep and b.is_floating_point():
                    b.data = b.data.to(self.dtype)
        for m in fp32_parts:
            m._amp_cast_back = self.dtype  # its output goes on to bf16 modules
        self.models.append(model)

    def take(self, opt: Any) -> None:
        """The optimizer updates the masters (its state in float32); the hooks copy gradients in and round out."""
        opt = getattr(opt, "optimizer", opt)  # an AcceleratedOptimizer's own
        if id(opt) in self._by_opt:
            return
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                master = self._masters.get(id(p))
                if master is None:
                    continue
                group["params"][i] = master
                if p in opt.state:  # an optimizer that already stepped: its state follows, in float32
                    opt.state[master] = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dim()
                                         else v for k, v in opt.state.pop(p).items()}
        mine = {id(m) for g in opt.param_groups for m in g["params"]}
        self._by_opt[id(opt)] = [(p, m) for p, m in self.pairs if id(m) in mine]

    def after_prepare(self, models: list[Any], optimizers: list[Any]) -> None:
        """``prepare`` moved the model: each master (and its optimizer state) goes to its parameter's device."""
        moved = {}
        for p, m in self.pairs:
            if m.device != p.device:
                m.data = m.data.to(p.device)
                moved[id(m)] = p.device
        for opt in optimizers:
            for m, state in getattr(opt, "optimizer", opt).state.items():
                if id(m) in moved:
                    for k, v in state.items():
                        if torch.is_tensor(v) and v.dim():
                            state[k] = v.to(moved[id(m)])

    # ------------------------------------------------------------------ each step

    def pairs_of(self, opt: Any) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        return self._by_opt.get(id(opt), [])

    def before_forward(self, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return cast_floats(args, self.dtype), cast_floats(kwargs, self.dtype)

    def after_forward(self, out: Any) -> Any:
        return cast_floats(out, torch.float32)

    def before_inner_step(self, opt: Any) -> None:
        for p, m in self.pairs_of(opt):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)

    def after_inner_step(self, opt: Any) -> None:
        with torch.no_grad():
            for p, m in self.pairs_of(opt):
                p.copy_(m)  # round to nearest into the model

    def after_zero_grad(self, opt: Any, set_to_none: bool) -> None:
        for p, _ in self.pairs_of(opt):
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # ------------------------------------------------------------------ checkpoints

    def _by_storage(self) -> dict[int, torch.nn.Parameter]:
        return {p.data_ptr(): m for p, m in self.pairs}

    def on_save(self, weights: list[dict[str, Any]]) -> None:
        """In Accelerate's save-state hook: the float32 masters replace the bf16 weights in the state dicts, and
        bf16 buffers are saved as float32 (exactly), so a checkpoint is float32 whichever precision wrote it."""
        masters = self._by_storage()
        for state in weights:
            for key, value in list(state.items()):
                if not torch.is_tensor(value):
                    continue
                if value.data_ptr() in masters:
                    state[key] = masters[value.data_ptr()].detach()
                elif value.dtype == self.dtype:
                    state[key] = value.float()

    def on_load(self, path: str | Path, models: list[torch.nn.Module]) -> None:
        """After ``accelerator.load_state(path)``: the masters from the checkpoint's weights (float32 when saved by
        any precision of this core), and the model rounded from them."""
        masters = self._by_storage()
        for i, model in enumerate(models):
            saved = _read_weights(Path(path), i)
            if saved is None:
                continue
            current = model.state_dict()
            with torch.no_grad():
                for key, value in saved.items():
                    now = current.get(key)
                    if now is not None and now.data_ptr() in masters:
                        masters[now.data_ptr()].copy_(value)
        self.round_into_model()

    def round_into_model(self) -> None:
        with torch.no_grad():
            for p, m in self.pairs:
                p.copy_(m)

    # ------------------------------------------------------------------ evaluation and export

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


def _read_weights(path: Path, index: int) -> dict[str, torch.Tensor] | None:
    """Model ``index``'s weights as Accelerate saved them (safetensors or a torch pickle), or None (sharded)."""
    from accelerate.utils import load_state_dict

    suffix = "" if index == 0 else f"_{index}"
    for name in (f"model{suffix}.safetensors", f"pytorch_model{suffix}.bin"):
        if (path / name).is_file():
            return load_state_dict(str(path / name))
    return None
