"""``amptpl doctor``: what this machine and Python would do with a generated project, on one screen.

Run against the installed package, like test_cli.py. Each ``amptpl doctor`` starts one child Python that
imports torch, accelerate and datasets (a few seconds), so the real report is taken once per module where it
can be; "torch missing" and "torch broken" are made by putting a fake ``torch`` package first on the child's
PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amptpl.cli import app
from amptpl.doctor import cpu_bf16, cpu_flags, diagnose, predict_launch, render_text
from amptpl.render import render_project
from amptpl.resources import CONFIGS_ENV, TEMPLATE_ENV, template_root

TERMINAL = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"}
try:  # click < 8.2 mixes stderr into stdout unless told not to; 8.2 removed the argument
    cli = CliRunner(env=TERMINAL, mix_stderr=False)
except TypeError:
    cli = CliRunner(env=TERMINAL)

# The --json keys, documented in amptpl/doctor.py and docs/doctor.md: tools rely on them.
TOP_KEYS = {
    "amptpl", "ok", "python", "packages", "devices", "cuda", "cpu", "tf32", "auto_precision", "accelerate",
    "launch", "project", "warnings", "problems",
}  # fmt: skip
NESTED_KEYS = {
    "python": {"version", "executable", "implementation", "platform", "venv"},
    "cuda": {"available", "build", "device_count", "warnings"},
    "cpu": {"flags_source", "amx_bf16", "avx512_bf16", "bf16_feature", "torch_capability", "torch_amx_tile",
            "torch_avx512_bf16"},
    "tf32": {"matmul_allow_tf32", "cudnn_allow_tf32", "float32_matmul_precision"},
    "auto_precision": {"device", "requested", "effective", "reason", "under_launch", "timed_candidates", "error"},
    "accelerate": {"config_file", "config_exists", "distributed_type", "num_processes", "num_machines",
                   "mixed_precision", "use_cpu", "config_error", "env"},
    "launch": {"processes", "distributed_type", "launcher", "why"},
}  # fmt: skip
PACKAGE_KEYS = {"version", "status", "error", "location"}
PROJECT_KEYS = {"path", "package", "installed", "location", "from_project_src", "error"}

TORCH_MISSING = "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
TORCH_RAISES = "raise RuntimeError('simulated: libtorch_cpu.so: cannot open shared object file')\n"
TORCH_DEPENDENCY_MISSING = "raise ModuleNotFoundError(\"No module named 'sympy'\", name='sympy')\n"


@pytest.fixture(autouse=True)
def _real_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test uses the installed template: the one doctor imports the auto pick from."""
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


@pytest.fixture
def no_accelerate_config(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME: no default accelerate config, whatever this machine has."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def real_report(tmp_path_factory) -> dict:
    """`amptpl doctor --json` on this machine, in an empty folder, with no accelerate config."""
    folder = tmp_path_factory.mktemp("doctor")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("HF_HOME", str(folder / "hf-home"))
        mp.delenv(TEMPLATE_ENV, raising=False)
        result = cli.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def shadow_torch(root: Path, code: str) -> Path:
    """A folder holding a fake `torch` package whose import runs `code`; put it first on PYTHONPATH."""
    (root / "shadow" / "torch").mkdir(parents=True)
    (root / "shadow" / "torch" / "__init__.py").write_text(code)
    return root / "shadow"


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------------- the real report


def test_doctor_json_is_one_object_with_the_documented_keys(real_report):
    assert set(real_report) == TOP_KEYS
    for key, keys in NESTED_KEYS.items():
        assert set(real_report[key]) == keys, key
    assert set(real_report["packages"]) == {"torch", "accelerate", "datasets"}
    for entry in real_report["packages"].values():
        assert set(entry) == PACKAGE_KEYS
    assert real_report["project"] is None  # no .amptpl.json in that folder
    assert real_report["ok"] is True and real_report["problems"] == []


def test_doctor_reports_the_installed_versions_of_torch_accelerate_and_datasets(real_report):
    for name in ("torch", "accelerate", "datasets"):
        entry = real_report["packages"][name]
        assert entry["status"] == "ok", entry
        assert entry["version"] == importlib.metadata.version(name)
    assert real_report["python"]["executable"] == sys.executable


def test_doctors_auto_pick_is_what_the_template_cores_resolve_picks_on_this_machine(real_report):
    auto = real_report["auto_precision"]
    assert auto["device"] == ("cuda" if real_report["cuda"]["available"] else "cpu")
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from project.amp.precision import resolve; r = resolve('auto', sys.argv[2]);"
        "from project.amp.debug.autopick import candidates;"
        "print(json.dumps([r.effective, r.reason, candidates(sys.argv[2])]))"
    )
    src = Path(str(template_root())) / "src"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src), auto["device"]], capture_output=True, text=True, check=True
    )
    assert json.loads(proc.stdout) == [auto["effective"], auto["reason"], auto["timed_candidates"]]


def test_a_machine_without_cuda_starts_one_process_under_a_plain_accelerate_launch(real_report):
    if real_report["cuda"]["device_count"] > 1:
        pytest.skip("this machine has several GPUs: accelerate launch starts one process per GPU")
    assert real_report["launch"]["processes"] == 1
    assert real_report["accelerate"]["config_exists"] is False


def test_doctor_prints_one_screen_with_versions_the_auto_pick_and_the_installed_project(
    tmp_path, monkeypatch, no_accelerate_config
):
    project = render_project("doc-proj", tmp_path).path
    monkeypatch.chdir(project)
    monkeypatch.setenv("PYTHONPATH", str(project / "src"))  # as `pip install -e .` would make it importable
    result = cli.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 24, result.stdout  # one screen
    text = result.stdout
    assert f"torch         {importlib.metadata.version('torch')}" in text
    assert "amp.precision=auto -> " in text
    assert "`accelerate launch` starts " in text
    assert f"doc_proj: importable from {project / 'src' / 'doc_proj'} (this project's src/)" in text
    assert result.stderr == ""


def test_doctor_json_from_a_fresh_process_shows_the_one_process_trap_and_a_project_not_installed(tmp_path):
    """A MULTI_CPU accelerate config with num_processes=2 starts ONE process: doctor warns, and still exits 0."""
    home = tmp_path / "hf-home"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
        "num_machines: 1\nmixed_precision: 'no'\nuse_cpu: true\n"
    )
    project = render_project("doc-proj", tmp_path).path
    env = {**os.environ, **TERMINAL, "HF_HOME": str(home), "ACCELERATE_USE_CPU": "1"}
    env.pop("PYTHONPATH", None)
    env.pop(TEMPLATE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "amptpl", "doctor", "--json"],
        capture_output=True, text=True, env=env, cwd=project, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    acc = report["accelerate"]
    assert acc["config_file"] == str(home / "accelerate" / "default_config.yaml")
    assert (acc["config_exists"], acc["distributed_type"], acc["num_processes"]) == (True, "MULTI_CPU", 2)
    assert acc["env"]["ACCELERATE_USE_CPU"] == "1"
    assert report["launch"]["processes"] == 1
    assert any("ONE process" in w and "num_processes=2" in w for w in report["warnings"]), report["warnings"]
    assert report["auto_precision"]["device"] == "cpu"  # ACCELERATE_USE_CPU, as PartialState reads it
    assert report["project"]["package"] == "doc_proj"
    assert report["project"]["installed"] is False


# ---------------------------------------------------------------------------------------------------- no torch


@pytest.mark.parametrize(
    ("torch_init", "exit_code", "says"),
    [
        pytest.param(TORCH_MISSING, 0, "torch is not installed", id="missing"),
        pytest.param(TORCH_RAISES, 1, "RuntimeError: simulated: libtorch_cpu.so", id="import-raises"),
        pytest.param(TORCH_DEPENDENCY_MISSING, 1, "No module named 'sympy'", id="a-dependency-is-missing"),
    ],
)
def test_doctor_without_a_working_torch_still_reports_and_exits_1_only_when_the_install_is_broken(
    tmp_path, monkeypatch, no_accelerate_config, torch_init, exit_code, says
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(shadow_torch(tmp_path, torch_init)))
    result = cli.invoke(app, ["doctor"])
    assert result.exit_code == exit_code, result.output + result.stderr
    assert "python" in result.stdout and "datasets" in result.stdout  # the rest of the report is there
    assert "devices       unknown (needs torch)" in result.stdout
    if exit_code == 0:
        assert result.stderr == ""
        assert "torch         not installed" in result.stdout
        assert "pip install torch" in result.stdout and says in result.stdout
        assert "accelerate    " in result.stdout and "needs torch" in result.stdout
    else:
        line = one_error_line(result)
        assert line.startswith("Error: broken: torch") and "`import torch` raises" in line and says in line


def cli_only_python(root: Path) -> Path:
    """A venv with no packages at all, as under a CLI-only install (no torch, accelerate or datasets)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "cli-only")], check=True, timeout=120)
    return root / "cli-only" / "bin" / "python"


@pytest.mark.parametrize(
    ("installed", "status", "row", "warns"),
    [
        pytest.param({}, "missing", "not installed (pip install accelerate)",
                     "accelerate is not installed: pip install accelerate", id="accelerate-missing"),
        pytest.param({"accelerate": "import torch\n"}, "unavailable",
                     "UNAVAILABLE: needs torch, which cannot be imported", None, id="torch-missing-accelerate-present"),
    ],
)  # fmt: skip
def test_doctor_in_a_python_without_torch_says_accelerate_needs_torch_only_when_accelerate_is_installed(
    tmp_path, monkeypatch, no_accelerate_config, installed, status, row, warns
):
    python = cli_only_python(tmp_path)
    for name, code in installed.items():  # a fake package on the child's PYTHONPATH, as an install would put it
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    report = diagnose(python=str(python), cwd=tmp_path, environ={"HF_HOME": str(no_accelerate_config)})
    assert report.ok, report.problems
    assert report.packages["torch"]["status"] == "missing"
    assert report.packages["accelerate"]["status"] == status
    lines = render_text(report)
    assert any(line.startswith("torch") and line.endswith("not installed (pip install torch)") for line in lines)
    (accelerate,) = [line for line in lines if line.startswith("accelerate")]
    assert accelerate.endswith(row), lines
    assert ("needs torch" in accelerate) == (status == "unavailable")
    assert ("not installed" in accelerate) == (status == "missing")
    accelerate_warnings = [w for w in report.warnings if w.startswith("accelerate")]
    assert accelerate_warnings == ([warns] if warns else [])


def test_doctor_json_without_torch_says_missing_and_unavailable_not_broken(tmp_path, monkeypatch, no_accelerate_config):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(shadow_torch(tmp_path, TORCH_MISSING)))
    result = cli.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["packages"]["torch"]["status"] == "missing"
    assert report["packages"]["accelerate"]["status"] == "unavailable"
    assert report["packages"]["datasets"]["status"] == "ok"
    assert report["cuda"] is None and report["auto_precision"] is None and report["tf32"] is None
    assert any("pip install torch" in w for w in report["warnings"])


# ---------------------------------------------------------------------------------------------------- pieces


# What a probe reports when torch is not installed (the shape PROBE prints), for tests of the parent's side.
NO_TORCH_PROBE = {
    "modules": {
        "torch": {"ok": False, "error": {"type": "ModuleNotFoundError", "message": "No module named 'torch'",
                                         "missing": "torch"}},
        "accelerate": {"ok": False, "skipped": "torch"},
        "datasets": {"ok": True, "version": "9.9.9", "file": "/x/datasets/__init__.py"},
    },
    "project": None, "torch": None, "auto": None, "default_config_file": None,
}  # fmt: skip


@pytest.mark.parametrize(
    ("flags_line", "amx", "avx512", "feature"),
    [
        ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True, True, "AMX-BF16"),
        ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16", False, True, "AVX512-BF16"),
        ("flags\t\t: fpu sse2 avx2 avx512f", False, False, None),
        ("flags\t\t: fp asimd bf16", False, False, None),  # an ARM bf16 flag is not one of these two
    ],
)
def test_cpu_bf16_features_come_from_the_cpuinfo_flags(tmp_path, flags_line, amx, avx512, feature):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Fake CPU\n{flags_line}\n\nprocessor\t: 1\n")
    assert cpu_bf16(cpu_flags(cpuinfo)) == {"amx_bf16": amx, "avx512_bf16": avx512, "bf16_feature": feature}


def test_an_unreadable_cpuinfo_gives_unknown_flags_not_an_error(tmp_path):
    assert cpu_flags(tmp_path / "absent") is None
    assert cpu_bf16(None) == {"amx_bf16": None, "avx512_bf16": None, "bf16_feature": None}


def test_the_report_shows_the_cpu_flags_it_was_given_even_without_torch(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n")
    report = diagnose(cwd=tmp_path, cpuinfo_path=cpuinfo, environ={"HF_HOME": str(tmp_path)}, probe=NO_TORCH_PROBE)
    assert report.cpu["bf16_feature"] == "AMX-BF16" and report.cpu["flags_source"] == str(cpuinfo)
    assert report.ok
    bf16_row = next(line for line in render_text(report) if line.startswith("bf16"))
    assert "AMX-BF16" in bf16_row


def test_an_unreadable_accelerate_config_is_one_problem_naming_the_file(tmp_path):
    config = tmp_path / "accelerate" / "default_config.yaml"
    config.parent.mkdir()
    config.write_text("distributed_type: [MULTI_GPU\n")
    report = diagnose(cwd=tmp_path, environ={"HF_HOME": str(tmp_path)}, probe=NO_TORCH_PROBE)
    assert not report.ok
    assert len(report.problems) == 1 and str(config) in report.problems[0]
    assert report.launch["launcher"] is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("distributed_type: MULTI_GPU\nnum_processes: many\n", "num_processes: must be a whole number, got 'many'"),
        ("distributed_type: NO\nmixed_precision: fp64\n", "mixed_precision: must be one of no, fp16, bf16, fp8"),
        ("num_processes: 1\n", "distributed_type: missing"),
    ],
)
def test_an_accelerate_config_with_a_value_launch_stops_on_is_a_problem_naming_the_file(tmp_path, text, says):
    config = tmp_path / "accelerate" / "default_config.yaml"
    config.parent.mkdir()
    config.write_text(text)
    report = diagnose(cwd=tmp_path, environ={"HF_HOME": str(tmp_path)}, probe=NO_TORCH_PROBE)
    assert not report.ok and report.launch["processes"] == 0
    (problem,) = report.problems
    assert problem.startswith(f"{config}: accelerate launch cannot use it (") and says in problem


def test_doctor_with_a_default_config_accelerate_refuses_says_broken_and_exits_1(tmp_path, monkeypatch):
    """A value only accelerate knows is wrong (a distributed_type it has no name for) is checked by accelerate."""
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("distributed_type: BOGUS_TYPE\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["doctor"])
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert line.startswith("Error: broken: ") and str(config) in line and "BOGUS_TYPE" in line
    assert "starts 1 process" not in result.stdout


def test_an_invalid_project_manifest_here_is_a_problem(tmp_path):
    (tmp_path / ".amptpl.json").write_text('{"package": "not an identifier"}')
    report = diagnose(cwd=tmp_path, environ={"HF_HOME": str(tmp_path)}, probe=NO_TORCH_PROBE)
    assert report.project["error"] and report.project["package"] is None
    assert any(".amptpl.json" in p and "identifier" in p for p in report.problems)


@pytest.mark.parametrize(
    ("config", "cuda_devices", "processes", "launcher", "warns"),
    [
        (None, 0, 1, "python", False),
        (None, 1, 1, "python", False),
        (None, 4, 4, "torchrun", False),
        ({"distributed_type": "MULTI_GPU", "num_processes": 2, "use_cpu": False}, 0, 2, "torchrun", False),
        ({"distributed_type": "MULTI_GPU", "num_processes": 8}, 8, 8, "torchrun", False),
        ({"distributed_type": "FSDP", "num_processes": 4}, 4, 4, "torchrun", False),
        ({"distributed_type": "DEEPSPEED", "num_processes": 4}, 4, 4, "deepspeed", False),
        ({"distributed_type": "MULTI_CPU", "num_processes": 2, "use_cpu": True}, 0, 1, "python", True),
        ({"distributed_type": "NO", "num_processes": 2}, 0, 1, "python", True),
        ({"distributed_type": "NO", "num_processes": 1, "use_cpu": True}, 0, 1, "python", False),
        ({"distributed_type": "MULTI_CPU", "num_processes": 4, "mpirun_config": {"mpirun_hostfile": "/h"}},
         0, 4, "mpirun", False),
    ],
)  # fmt: skip
def test_doctor_predicts_how_many_processes_a_plain_accelerate_launch_starts(
    config, cuda_devices, processes, launcher, warns
):
    launch, warning = predict_launch(config, cuda_devices)
    assert (launch["processes"], launch["launcher"]) == (processes, launcher)
    assert (warning is not None) == warns
    if warns:
        assert "ONE process" in warning and "MULTI_GPU" in warning
