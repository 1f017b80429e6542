"""What this machine and this Python would do with a generated project: ``amptpl doctor``.

One screen: Python and the versions of torch, accelerate and datasets; the devices; bf16 and fp16 support;
TF32; the accelerate config in effect and what ``accelerate launch`` would start; what ``amp.precision=auto``
picks here and why; whether the project in the current folder is installed.

Everything that needs torch runs in a child Python (``sys.executable -c PROBE``) that prints JSON, so doctor
works, and says what to do, when torch is missing or broken. The auto pick is not re-implemented here: the
child imports the template's own core (``<template>/src/project/amp/precision.py`` from the installed wheel)
and calls ``resolve("auto", device)`` on the device a run would use, so doctor and training cannot disagree.

``diagnose()`` returns a :class:`Report`; ``Report.as_json()`` is the ``--json`` output. Its keys are stable:

    amptpl           amptpl's version
    ok               false when something is broken (then ``amptpl doctor`` exits 1)
    python           {version, executable, implementation, platform, venv}
    packages         {torch|accelerate|datasets: {version, status, error, location}}; status is ok, missing
                     (not installed), unavailable (installed, but a package it needs is missing or broken), broken,
                     or unknown (not reached)
    devices          [{index, name, capability, bf16_native, fp16_tensor_cores}] (CUDA GPUs; [] without)
    cuda             {available, build, device_count, warnings} or null without torch
    cpu              {flags_source, amx_bf16, avx512_bf16, bf16_feature, torch_capability,
                     torch_amx_tile, torch_avx512_bf16}
    tf32             {matmul_allow_tf32, cudnn_allow_tf32, float32_matmul_precision} or null without torch
    auto_precision   {device, requested, effective, reason, under_launch, timed_candidates, error}; under_launch
                     is the pick under ``accelerate launch`` with the config's mixed_precision when that differs,
                     else null; timed_candidates the precisions a project times on its model first ([]: the rule)
    accelerate       {config_file, config_exists, distributed_type, num_processes, num_machines,
                     mixed_precision, use_cpu, config_error, env}; env holds every ACCELERATE_* variable
    launch           {processes, distributed_type, launcher, why}: what a plain ``accelerate launch`` starts
    project          {path, package, installed, location, from_project_src, error} or null without a
                     ``.amptpl.json`` in the current folder
    warnings         lines worth reading (torch missing, the one-process trap, a stale install)
    problems         one line per broken thing
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AmptplError
from .launchconfig import LOAD_CHECK, config_problem, default_config_file, predict_launch, read_accelerate_config
from .manifest import MANIFEST

PACKAGES = ("torch", "accelerate", "datasets")

PROBE_TIMEOUT_S = 300
JSON_MARK = "AMPTPL_DOCTOR_JSON "
STAGE_MARK = "AMPTPL_DOCTOR_STAGE "
INSTALL_TORCH = "pip install torch (for a CUDA build, see https://pytorch.org/get-started/locally/)"

# The child: prints progress markers (so a crash in a native import can be placed) and one JSON line.
# argv: template src folder ("" when unavailable), project package ("" when none). Python 3.10 syntax.
PROBE = LOAD_CHECK + r'''
import importlib, importlib.util, inspect, json, os, sys, warnings

template_src, package = sys.argv[1], sys.argv[2]
out = {"modules": {}, "project": None, "torch": None, "auto": None, "default_config_file": None}


def stage(name):
    print("AMPTPL_DOCTOR_STAGE " + name, flush=True)


def error(exc):
    text = str(exc).strip()
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    return {"type": type(exc).__name__, "message": text.splitlines()[0] if text else "", "missing": missing}


def attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:
        return None, error(exc)


# the project first, before the template's folder goes on sys.path: is its package importable as it stands?
if package:
    stage("find_spec " + package)
    spec, err = attempt(importlib.util.find_spec, package)
    out["project"] = {"error": err, "found": spec is not None,
                      "origin": getattr(spec, "origin", None),
                      "locations": list(getattr(spec, "submodule_search_locations", None) or [])}


def load(name):
    stage("import " + name)
    try:
        mod = importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        out["modules"][name] = {"ok": False, "error": error(exc)}
        return None
    out["modules"][name] = {"ok": True, "version": getattr(mod, "__version__", None),
                            "file": getattr(mod, "__file__", None)}
    return mod


torch = load("torch")
if torch is not None:
    load("accelerate")
else:  # not imported (it would import the failed torch again): installed, it is skipped; else it is missing
    stage("find_spec accelerate")
    spec, err = attempt(importlib.util.find_spec, "accelerate")
    if spec is None and err is None:
        out["modules"]["accelerate"] = {"ok": False, "error": {
            "type": "ModuleNotFoundError", "message": "No module named 'accelerate'", "missing": "accelerate"}}
    else:
        out["modules"]["accelerate"] = {"ok": False, "skipped": "torch"}
load("datasets")

if torch is not None:
    stage("torch devices")
    info = {"version": str(torch.__version__), "cuda_build": torch.version.cuda,
            "hip_build": getattr(torch.version, "hip", None), "devices": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available, err = attempt(torch.cuda.is_available)
        count, count_err = attempt(torch.cuda.device_count) if available else (0, None)
    info["cuda_available"] = bool(available)
    info["device_count"] = count or 0
    info["cuda_errors"] = [e for e in (err, count_err) if e]
    info["cuda_warnings"] = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    for i in range(info["device_count"]):
        dev = {"index": i}
        dev["name"], _ = attempt(torch.cuda.get_device_name, i)
        cap, _ = attempt(torch.cuda.get_device_capability, i)
        dev["capability"] = list(cap) if cap else None
        try:
            with torch.cuda.device(i):
                dev["bf16_native"] = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before including_emulation: native bf16 is compute capability 8.0+
            dev["bf16_native"] = bool(cap and tuple(cap) >= (8, 0))
        except Exception:
            dev["bf16_native"] = None
        dev["fp16_tensor_cores"] = bool(cap and tuple(cap) >= (7, 0)) if not info["hip_build"] else None
        info["devices"].append(dev)
    cpu_mod = getattr(torch._C, "_cpu", None)
    for key, fn_name in (("amx_tile", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        fn = getattr(cpu_mod, fn_name, None)
        info["cpu_" + key] = attempt(fn)[0] if fn is not None else None
    info["cpu_capability"] = attempt(torch.backends.cpu.get_cpu_capability)[0] if hasattr(
        torch.backends, "cpu") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch deprecates allow_tf32 in favour of fp32_precision
        info["tf32"] = {"matmul_allow_tf32": attempt(lambda: bool(torch.backends.cuda.matmul.allow_tf32))[0],
                        "cudnn_allow_tf32": attempt(lambda: bool(torch.backends.cudnn.allow_tf32))[0],
                        "float32_matmul_precision": attempt(torch.get_float32_matmul_precision)[0]}
    out["torch"] = info

    # the device train.py resolves for: PartialState(cpu=not torch.cuda.is_available()); ACCELERATE_USE_CPU too
    # (read by the template's own rule when it is there, as for the auto pick)
    def env_flag(name):
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")
    if template_src:
        sys.path.insert(0, template_src)
        env_flag = attempt(lambda: importlib.import_module("project.amp.defaults").env_flag)[0] or env_flag
        sys.path.pop(0)
    use_cpu = env_flag("ACCELERATE_USE_CPU")
    device = "cuda" if info["cuda_available"] and not use_cpu else "cpu"
    auto = {"device": device}
    if template_src:
        stage("auto precision")
        sys.path.insert(0, template_src)
        try:
            precision = importlib.import_module("project.amp.precision")
            params = inspect.signature(precision.resolve).parameters
            env_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
            kw = {"launcher": env_launcher} if "launcher" in params and env_launcher else {}
            r = precision.resolve("auto", device, **kw)
            auto.update(requested=r.requested, effective=r.effective, reason=r.reason)
            if "launcher" in params:  # what it picks when `accelerate launch` passes a mixed_precision
                auto["by_launcher"] = {}
                for mp in ("no", "fp16", "bf16"):
                    r = precision.resolve("auto", device, launcher=mp)
                    auto["by_launcher"][mp] = {"effective": r.effective, "reason": r.reason}
            autopick = attempt(importlib.import_module, "project.amp.debug.autopick")[0]
            if autopick is not None:  # what a project times on its own model before it trusts the rule
                auto["timed_candidates"] = attempt(autopick.candidates, device)[0] or []
        except Exception as exc:
            auto["error"] = error(exc)
    out["auto"] = auto

if out["modules"].get("accelerate", {}).get("ok"):
    stage("accelerate config")
    try:
        from accelerate.commands.config import default_config_file
        out["default_config_file"] = default_config_file
        if os.path.isfile(default_config_file):
            out["default_config_load_error"] = config_load_error(default_config_file)
    except Exception as exc:
        out["default_config_error"] = error(exc)

stage("done")
print("AMPTPL_DOCTOR_JSON " + json.dumps(out), flush=True)
'''


@dataclass
class Report:
    """Everything ``amptpl doctor`` found; ``as_json()`` is the ``--json`` object (keys in the module doc)."""

    python: dict[str, Any]
    packages: dict[str, dict[str, Any]]
    devices: list[dict[str, Any]]
    cuda: dict[str, Any] | None
    cpu: dict[str, Any]
    tf32: dict[str, Any] | None
    auto_precision: dict[str, Any] | None
    accelerate: dict[str, Any]
    launch: dict[str, Any]
    project: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"amptpl": __version__, "ok": self.ok, **asdict(self)}


# ---------------------------------------------------------------------------------------------------- probe


def run_probe(
    python: str = sys.executable, template_src: str = "", package: str = "", cwd: str | os.PathLike[str] = "."
) -> dict[str, Any]:
    """Run ``PROBE`` in ``python`` (in ``cwd``); return its JSON, or ``{"failed": line, "stage": last stage}``."""
    try:
        proc = subprocess.run(
            [python, "-c", PROBE, template_src, package],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
        stdout, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"failed": f"did not finish in {PROBE_TIMEOUT_S} s", "stage": _last_stage(out)}
    except OSError as exc:
        return {"failed": f"could not start {python}: {exc}", "stage": None}
    for line in reversed(stdout.splitlines()):
        if line.startswith(JSON_MARK):
            return json.loads(line[len(JSON_MARK) :])
    if code < 0:
        why = f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exited {code}"
    else:
        tail = proc.stderr.strip().splitlines()
        why = f"exited {code}" + (f": {tail[-1]}" if tail else "")
    return {"failed": why, "stage": _last_stage(stdout)}


def _last_stage(stdout: str) -> str | None:
    stages = [line[len(STAGE_MARK) :] for line in stdout.splitlines() if line.startswith(STAGE_MARK)]
    return stages[-1] if stages else None


# ---------------------------------------------------------------------------------------------------- pieces


def cpu_flags(cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags (first ``flags`` line of ``cpuinfo_path``), or None when it cannot be read."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def cpu_bf16(flags: set[str] | None) -> dict[str, Any]:
    """AMX-BF16 / AVX512-BF16 from the CPU flags, and the feature bf16 autocast would use (else None)."""
    amx = None if flags is None else "amx_bf16" in flags
    avx = None if flags is None else "avx512_bf16" in flags
    return {"amx_bf16": amx, "avx512_bf16": avx, "bf16_feature": "AMX-BF16" if amx else "AVX512-BF16" if avx else None}


# ---------------------------------------------------------------------------------------------------- report


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _err_line(err: Mapping[str, Any]) -> str:
    return f"{err['type']}: {err['message']}" if err.get("message") else str(err["type"])


def _packages(probe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    modules = probe.get("modules") or {}
    result = {}
    for name in PACKAGES:
        entry = {"version": _version(name), "status": "unknown", "error": None, "location": None}
        mod = modules.get(name)
        if mod is None:
            pass  # the probe did not get this far
        elif mod.get("ok"):
            entry.update(status="ok", version=mod.get("version") or entry["version"], location=mod.get("file"))
        elif mod.get("skipped"):
            entry.update(status="unavailable", error=f"needs {mod['skipped']}, which cannot be imported")
        else:
            err = mod["error"]
            missing = (err.get("missing") or "").split(".")[0]
            if err["type"] == "ModuleNotFoundError" and missing == name:
                entry.update(status="missing", error=_err_line(err))
            elif err["type"] == "ModuleNotFoundError" and missing in PACKAGES and modules.get(missing, {}).get("ok") is False:
                entry.update(status="unavailable", error=f"needs {missing}, which cannot be imported")
            else:
                entry.update(status="broken", error=_err_line(err))
        result[name] = entry
    return result


def _project(cwd: Path, probe: Mapping[str, Any], package: str | None, manifest_error: str | None) -> dict | None:
    if package is None and manifest_error is None:
        return None
    info: dict[str, Any] = {"path": str(cwd), "package": package, "installed": None, "location": None,
                            "from_project_src": None, "error": manifest_error}  # fmt: skip
    found = probe.get("project")
    if package is None or found is None:
        return info
    if found.get("error"):
        info["error"] = f"looking up {package} raised {_err_line(found['error'])}"
        return info
    info["installed"] = bool(found.get("found"))
    if info["installed"]:
        location = (found.get("locations") or [None])[0] or (os.path.dirname(found["origin"]) if found.get("origin") else None)
        info["location"] = location
        if location:
            own = (cwd / "src" / package).resolve()
            info["from_project_src"] = Path(location).resolve() == own
    return info


def _read_manifest(here: Path, problems: list[str]) -> tuple[str | None, str | None]:
    """``(package, manifest_error)`` of the project in ``here``; both None without a ``.amptpl.json``."""
    if not (here / MANIFEST).exists():
        return None, None
    from .runner import read_package  # the same check as `amptpl run`

    try:
        return read_package(here), None
    except AmptplError as exc:
        problems.append(str(exc))
        return None, str(exc)


def _template_src(problems: list[str]) -> str:
    """The installed template's ``src`` folder, whose ``project.amp.precision`` the probe asks ("" when unusable)."""
    try:
        from .resources import template_root

        root = template_root()
        if isinstance(root, Path) and (root / "src" / "project" / "amp" / "precision.py").is_file():
            return str(root / "src")
        auto_error = f"the installed template has no src/project/amp/precision.py (looked in {root})"
    except AmptplError as exc:
        auto_error = str(exc)
    if auto_error:
        problems.append(f"amptpl: {auto_error}")
    return ""


def _package_notes(packages: Mapping[str, Mapping[str, Any]], python: str, warnings: list[str],
                   problems: list[str]) -> None:  # fmt: skip
    """A problem per broken package; a warning with the install line per missing one."""
    for name, entry in packages.items():
        if entry["status"] == "broken":
            what = f"{name} {entry['version']}" if entry["version"] else name
            problems.append(f"{what} is installed but `import {name}` raises {entry['error']}")
    if packages["torch"]["status"] == "missing":
        warnings.append(f"torch is not installed in {python}: {INSTALL_TORCH}")
    if packages["accelerate"]["status"] == "missing":
        warnings.append("accelerate is not installed: pip install accelerate")
    if packages["datasets"]["status"] == "missing":
        warnings.append("datasets is not installed (the default example loads its data with it): pip install datasets")


def _cuda(torch_info: Mapping[str, Any] | None, warnings: list[str], problems: list[str]) -> dict | None:
    """The ``cuda`` section (None without torch); CUDA's warnings and errors become warnings and problems."""
    if not torch_info:
        return None
    warnings.extend(f"CUDA: {w}" for w in torch_info["cuda_warnings"])
    problems.extend(f"CUDA: torch.cuda raises {_err_line(e)}" for e in torch_info["cuda_errors"])
    return {"available": torch_info["cuda_available"], "build": torch_info["cuda_build"] or torch_info["hip_build"],
            "device_count": torch_info["device_count"], "warnings": torch_info["cuda_warnings"]}  # fmt: skip


def _cpu(cpuinfo_path: str | os.PathLike[str], torch_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``cpu`` section: bf16 features from the CPU flags, and what torch says about them."""
    flags = cpu_flags(cpuinfo_path)
    torch_says = torch_info or {}
    return {"flags_source": str(cpuinfo_path) if flags is not None else None, **cpu_bf16(flags),
            "torch_capability": torch_says.get("cpu_capability"),
            "torch_amx_tile": torch_says.get("cpu_amx_tile"),
            "torch_avx512_bf16": torch_says.get("cpu_avx512_bf16")}  # fmt: skip


def _accelerate(config_file: str, config: Mapping[str, Any] | None, config_error: str | None,
                env: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
    """The ``accelerate`` section: the default config's fields that decide a launch, and ACCELERATE_* variables."""
    config = config or {}
    mixed_precision = config.get("mixed_precision")  # YAML reads an unquoted `no` as false
    return {
        "config_file": config_file,
        "config_exists": os.path.isfile(config_file),
        "distributed_type": config.get("distributed_type"),
        "num_processes": config.get("num_processes"),
        "num_machines": config.get("num_machines"),
        "mixed_precision": "no" if mixed_precision is False else mixed_precision,
        "use_cpu": config.get("use_cpu"),
        "config_error": config_error,
        "env": {k: v for k, v in sorted(env.items()) if k.startswith("ACCELERATE_")},
    }


def _launch(config: Mapping[str, Any] | None, config_error: str | None, config_file: str, cuda: Mapping | None,
            warnings: list[str], problems: list[str]) -> dict[str, Any]:  # fmt: skip
    """The ``launch`` section: what a plain ``accelerate launch`` starts; an unreadable config is a problem."""
    if config_error:
        problems.append(f"{config_file}: accelerate launch cannot use it ({config_error})")
        return {"processes": 0, "distributed_type": None, "launcher": None,
                "why": "it stops with an error: its default config cannot be used"}  # fmt: skip
    launch, trap = predict_launch(config, cuda["device_count"] if cuda else 0)
    if trap:
        warnings.append(trap)
    return launch


def _auto(raw: Mapping[str, Any] | None, accelerate: Mapping[str, Any], packages: Mapping[str, Mapping[str, Any]],
          problems: list[str]) -> dict[str, Any] | None:  # fmt: skip
    """The ``auto_precision`` section from the probe's pick (None without torch); a failing pick is a problem."""
    if raw is None:
        return None
    auto = {"device": raw["device"], "requested": raw.get("requested"), "effective": raw.get("effective"),
            "reason": raw.get("reason"), "under_launch": None, "timed_candidates": raw.get("timed_candidates") or [],
            "error": _err_line(raw["error"]) if raw.get("error") else None}  # fmt: skip
    mp = str(accelerate["mixed_precision"] or "no").lower()
    pick = (raw.get("by_launcher") or {}).get(mp)
    if pick and pick["effective"] != auto["effective"]:
        auto["under_launch"] = {"mixed_precision": mp, **pick}
    if auto["error"] and packages["accelerate"]["status"] == "ok":
        problems.append(f"the template's precision.resolve('auto', {raw['device']!r}) raises {auto['error']}")
    return auto


def _project_notes(project: Mapping[str, Any] | None, package: str | None, manifest_error: str | None,
                   warnings: list[str], problems: list[str]) -> None:  # fmt: skip
    """A warning when the project's package is imported from elsewhere; a problem when looking it up failed."""
    if project and project["installed"] and project["from_project_src"] is False:
        warnings.append(
            f"{package} is imported from {project['location']}, not from this project's src/: "
            "edits here are not used; `pip install -e .` in this folder"
        )
    if project and project["error"] and project["error"] != manifest_error:
        problems.append(f"project {package}: {project['error']}")


def _python_info(python: str) -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "executable": python,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "venv": sys.prefix != sys.base_prefix if python == sys.executable else None,
    }


def diagnose(
    python: str = sys.executable,
    cwd: str | os.PathLike[str] | None = None,
    cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo",
    environ: Mapping[str, str] | None = None,
    probe: Mapping[str, Any] | None = None,
) -> Report:
    """Look at this machine and Python; see the module docstring for what is reported.

    ``python`` is the interpreter that is asked (a child process; it alone imports torch), ``cwd`` the folder
    whose ``.amptpl.json`` is checked, ``cpuinfo_path`` where the CPU flags are read, ``environ`` the
    environment (for ACCELERATE_* and the accelerate config path). ``probe`` is a result of :func:`run_probe`
    to use instead of running it (tests).
    """
    env = os.environ if environ is None else environ
    here = Path.cwd() if cwd is None else Path(cwd)
    warnings: list[str] = []
    problems: list[str] = []  # each helper below adds its lines in this order: the order they are printed

    # the project in the current folder, before the probe (the probe looks its package up)
    package, manifest_error = _read_manifest(here, problems)
    template_src = _template_src(problems)
    if probe is None:
        probe = run_probe(python, template_src, package or "", here)
    if probe.get("failed"):
        where = f" during `{probe['stage']}`" if probe.get("stage") else ""
        problems.append(f"{python} {probe['failed']}{where}: that step of the install is broken")

    packages = _packages(probe)
    _package_notes(packages, python, warnings, problems)
    torch_info = probe.get("torch")
    cuda = _cuda(torch_info, warnings, problems)
    cpu = _cpu(cpuinfo_path, torch_info)

    config_file = probe.get("default_config_file") or default_config_file(env)
    config, config_error = read_accelerate_config(config_file)
    if config is not None and not config_error:  # values accelerate launch stops on: ours, then accelerate's loader
        config_error = config_problem(config) or probe.get("default_config_load_error")
    accelerate = _accelerate(config_file, config, config_error, env)
    launch = _launch(config, config_error, config_file, cuda, warnings, problems)
    auto = _auto(probe.get("auto"), accelerate, packages, problems)

    project = _project(here, probe, package, manifest_error)
    _project_notes(project, package, manifest_error, warnings, problems)
    devices = torch_info["devices"] if torch_info else []
    tf32 = torch_info["tf32"] if torch_info else None
    return Report(_python_info(python), packages, devices, cuda, cpu, tf32, auto, accelerate, launch, project,
                  warnings, problems)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- text


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def _package_rows(packages: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    for name, entry in packages.items():
        if entry["status"] == "ok":
            text = entry["version"] or "installed"
        elif entry["status"] == "missing":
            text = f"not installed (pip install {name})"
        elif entry["status"] == "unknown":
            text = f"{entry['version'] or '?'} (not checked: the probe stopped earlier)"
        else:
            text = f"{entry['version'] or '?'} {entry['status'].upper()}: {entry['error']}"
        rows.append((name, text))
    return rows


def _device_rows(report: Report) -> list[tuple[str, str]]:
    rows = []
    if report.cuda is None:
        rows.append(("devices", "unknown (needs torch)"))
    elif not report.devices:
        build = f"CUDA build {report.cuda['build']}" if report.cuda["build"] else "a CPU-only torch build"
        rows.append(("devices", f"cpu only: no CUDA GPU ({build})"))
    for dev in report.devices:
        cap = dev["capability"]
        cap_text = f"sm_{cap[0]}{cap[1]}" if cap else "capability ?"
        rows.append(("devices" if dev["index"] == 0 else "", f"cuda:{dev['index']}  {dev['name']}  {cap_text}"))
    return rows


def _dtype_rows(report: Report) -> list[tuple[str, str]]:
    """bf16 (each GPU, then the CPU's flags), fp16 and, with torch, the TF32 defaults."""
    cpu = report.cpu
    if cpu["flags_source"] is None:
        flags = "CPU flags unreadable"
    else:
        flags = f"CPU {cpu['bf16_feature'] or 'neither AMX-BF16 nor AVX512-BF16'} (flags in {cpu['flags_source']})"
    torch_cpu = [f"{k} {_yes(cpu[f'torch_{k}'])}" for k in ("amx_tile", "avx512_bf16") if cpu[f"torch_{k}"] is not None]
    if torch_cpu:
        flags += "; torch says " + ", ".join(torch_cpu)
    bf16 = [f"cuda:{d['index']} {'native' if d['bf16_native'] else 'emulated only'}" for d in report.devices]
    rows = [("bf16", "; ".join([*bf16, flags]))]
    fp16 = [f"cuda:{d['index']} tensor cores {_yes(d['fp16_tensor_cores'])}" for d in report.devices]
    if report.cuda is None:
        fp16 = ["unknown (needs torch)"]
    rows.append(("fp16", "; ".join(fp16) if fp16 else "no GPU: fp16 runs on the CPU with a CPU GradScaler (slow, exact)"))
    if report.tf32 is not None:
        t = report.tf32
        rows.append(("tf32", f"matmul allow_tf32={t['matmul_allow_tf32']}, precision={t['float32_matmul_precision']}; "
                             f"cudnn allow_tf32={t['cudnn_allow_tf32']} (defaults; projects set amp.tf32)"))  # fmt: skip
    return rows


def _auto_rows(auto: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if auto is None:
        return [("auto", "unknown (needs torch)")]
    if auto["error"]:
        return [("auto", f"on {auto['device']}: the template's resolve() failed: {auto['error']}")]
    rows = [("auto", f"amp.precision=auto -> {auto['effective']} on {auto['device']}: {auto['reason']}")]
    if auto.get("timed_candidates"):
        rows.append(("", f"that is the hardware rule: a project first times {' and '.join(auto['timed_candidates'])} "
                         "on its own model and runs the fastest (amp.auto.measure; cached)"))  # fmt: skip
    if auto["under_launch"]:
        u = auto["under_launch"]
        rows.append(("", f"under accelerate launch (mixed_precision: {u['mixed_precision']}) -> "
                         f"{u['effective']}: {u['reason']}"))  # fmt: skip
    return rows


def _accelerate_rows(acc: Mapping[str, Any], lau: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The default accelerate config, the ACCELERATE_* variables, and what a plain launch starts."""
    if acc["config_error"]:
        cfg = f"{acc['config_file']}: accelerate launch cannot use it ({acc['config_error']})"
    elif acc["config_exists"]:
        cfg = (f"{acc['config_file']}: distributed_type={acc['distributed_type']}, num_processes={acc['num_processes']}, "
               f"mixed_precision={acc['mixed_precision']}" + (", use_cpu=true" if acc["use_cpu"] else ""))  # fmt: skip
    else:
        cfg = f"{acc['config_file']} (none: defaults apply)"
    env_text = ", ".join(f"{k}={v}" for k, v in acc["env"].items()) or "none set"
    if lau["launcher"] is None:
        launch = f"`accelerate launch` fails: {lau['why']}"
    else:
        plural = "process" if lau["processes"] == 1 else "processes"
        launch = f"`accelerate launch` starts {lau['processes']} {plural} ({lau['launcher']}): {lau['why']}"
    return [("config", cfg), ("ACCELERATE_*", env_text), ("launch", launch)]


def _project_row(proj: Mapping[str, Any] | None) -> tuple[str, str]:
    if proj is None:
        return ("project", f"none here (no {MANIFEST} in this folder)")
    if proj["package"] is None:
        return ("project", f"{MANIFEST} here is invalid")
    if proj["installed"]:
        mine = " (this project's src/)" if proj["from_project_src"] else ""
        return ("project", f"{proj['package']}: importable from {proj['location']}{mine}")
    if proj["installed"] is False:
        return ("project", f"{proj['package']}: not installed here (`pip install -e .`, or `amptpl run .`)")
    return ("project", f"{proj['package']}: not checked")


def render_text(report: Report) -> list[str]:
    """The one-screen report, as plain lines (no markup); warnings and problems are not included."""
    py = report.python
    rows = [
        ("python", f"{py['version']}  {py['executable']}" + ("  (venv)" if py.get("venv") else "")),
        *_package_rows(report.packages),
        *_device_rows(report),
        *_dtype_rows(report),
        *_auto_rows(report.auto_precision),
        *_accelerate_rows(report.accelerate, report.launch),
        _project_row(report.project),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {text}" for label, text in rows]
