"""Accelerate launch configs, read without importing accelerate: where the default one is, what a
``accelerate launch`` with it starts, and why it cannot start at all.

``amptpl doctor`` reports with these; ``amptpl run`` refuses a config that ``accelerate launch`` would stop on
(one line naming the file and the bad value, before anything starts) and warns about the one-process trap.
Values that only accelerate knows (its ``DistributedType`` names, unknown keys) are checked by accelerate's own
loader in a child Python: ``LOAD_CHECK`` is a function both children define and call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

# distributed types that `accelerate launch` starts through torchrun (or deepspeed) with num_processes ranks
TORCHRUN_TYPES = frozenset(
    {"MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU", "MULTI_HPU",
     "MULTI_NEURON", "FSDP", "MEGATRON_LM"}
)  # fmt: skip


def default_config_file(environ: Mapping[str, str] | None = None) -> str:
    """Where ``accelerate launch`` looks for its default config: the rule of accelerate's config_args module.

    Used when accelerate cannot be imported; otherwise accelerate's own
    ``accelerate.commands.config.default_config_file`` (from the child) is what doctor reports.
    """
    env = os.environ if environ is None else environ
    cache = env.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.path.expanduser(env.get("HF_HOME", os.path.join(cache, "huggingface")))
    return os.path.join(home, "accelerate", "default_config.yaml")


def read_accelerate_config(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(config, error)`` for an accelerate config file (YAML or JSON); ``(None, None)`` when it does not exist."""
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                data = json.load(f)
            else:
                import yaml  # only here: pyyaml is not needed anywhere else on doctor's path

                data = yaml.safe_load(f)
    except Exception as exc:  # noqa: BLE001 - any parse error is reported as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{type(exc).__name__}: {first}"
    if not isinstance(data, dict):
        return None, f"expected a mapping of settings, got {type(data).__name__}"
    return data, None


def predict_launch(config: Mapping[str, Any] | None, cuda_devices: int) -> tuple[dict[str, Any], str | None]:
    """What a plain ``accelerate launch -m PKG.train`` starts with ``config`` (None: no config file).

    Returns ``(launch, warning)``: launch is ``{processes, distributed_type, launcher, why}``, warning names the
    one-process trap (a MULTI_CPU or NO config, or ``use_cpu: true``, with num_processes > 1 and no MPI host
    file: ``accelerate launch`` starts ONE process, silently). Follows accelerate 1.x's ``launch_command``.
    """
    if config is None:
        if cuda_devices > 1:
            why = f"no accelerate config: one process per CUDA GPU ({cuda_devices} found)"
            return {"processes": cuda_devices, "distributed_type": "MULTI_GPU", "launcher": "torchrun", "why": why}, None
        why = f"no accelerate config, {'1 CUDA GPU' if cuda_devices == 1 else 'no CUDA GPU'}"
        return {"processes": 1, "distributed_type": "NO", "launcher": "python", "why": why}, None

    dtype = str(config.get("distributed_type") or "NO").upper().removeprefix("DISTRIBUTEDTYPE.")
    try:
        n = int(config.get("num_processes") or 1)
    except (TypeError, ValueError):
        n = 1
    use_cpu = bool(config.get("use_cpu"))
    hostfile = (config.get("mpirun_config") or {}).get("mpirun_hostfile") if isinstance(
        config.get("mpirun_config"), dict) else None  # fmt: skip
    if dtype in TORCHRUN_TYPES or dtype == "DEEPSPEED":
        launcher = "deepspeed" if dtype == "DEEPSPEED" else "torchrun"
        where = " on the CPU (use_cpu: true)" if use_cpu else ""
        return {"processes": n, "distributed_type": dtype, "launcher": launcher,
                "why": f"config: {dtype} with num_processes={n}{where}"}, None  # fmt: skip
    if dtype == "XLA":
        return {"processes": n, "distributed_type": dtype, "launcher": "xla", "why": f"config: XLA, {n} cores"}, None
    if hostfile:
        return {"processes": n, "distributed_type": dtype, "launcher": "mpirun",
                "why": f"config: {dtype} with mpirun_hostfile {hostfile}"}, None  # fmt: skip
    launch = {"processes": 1, "distributed_type": dtype, "launcher": "python",
              "why": f"config: {dtype}{' with use_cpu: true' if use_cpu else ''}"}  # fmt: skip
    if n > 1:
        warning = (
            f"the accelerate config says {dtype}{' with use_cpu: true' if use_cpu else ''} and num_processes={n}, "
            "but `accelerate launch` starts ONE process (MULTI_CPU, like `--cpu`, needs an MPI launcher: "
            "mpirun_hostfile); for N CPU ranks use distributed_type: MULTI_GPU (configs/accelerate/cpu_2proc.yaml) "
            "or `amptpl run --num-processes N`"
        )
        return launch, warning
    return launch, None


MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")
WHOLE_NUMBERS = ("num_processes", "num_machines", "machine_rank")

# Python 3.10 source run in a child that imports accelerate: defines config_load_error(path) -> str | None.
LOAD_CHECK = r"""
def config_load_error(path):
    try:
        from accelerate.commands.config.config_args import load_config_from_file
        load_config_from_file(path)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return type(exc).__name__ + ": " + (lines[0] if lines else "")
    return None
"""


def config_problem(config: Mapping[str, Any]) -> str | None:
    """One line on the first value ``accelerate launch`` cannot use (None when it can): a missing
    ``distributed_type``, a non-number process count, an unknown ``mixed_precision``."""
    if config.get("distributed_type") in (None, ""):  # an unquoted NO reads as false: that is NO
        return "distributed_type: missing (e.g. NO, MULTI_GPU)"
    for key in WHOLE_NUMBERS:
        value = config.get(key)
        lowest = 0 if key == "machine_rank" else -1  # -1: accelerate's "not set" for num_processes
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or value < lowest):
            return f"{key}: must be a whole number, got {value!r}"
    mixed = config.get("mixed_precision")
    if mixed is not None and mixed is not False and str(mixed).lower() not in MIXED_PRECISIONS:
        return f"mixed_precision: must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed!r}"
    return None
