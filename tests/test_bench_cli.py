"""``amptpl run PROJECT --bench [args]`` runs ``python -m PACKAGE.bench args`` the way ``run`` runs training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amptpl.cli import app
from amptpl.errors import AmptplError
from amptpl.resources import CONFIGS_ENV, TEMPLATE_ENV
from amptpl.runner import build_run_command

TERMINAL = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"}
try:  # click < 8.2 mixes stderr into stdout unless told not to; 8.2 removed the argument
    cli = CliRunner(env=TERMINAL, mix_stderr=False)
except TypeError:
    cli = CliRunner(env=TERMINAL)

# records its arguments and exits 3, so a test sees exactly what reached the bench and its exit code
RECORD = "import json, pathlib, sys\npathlib.Path('argv.json').write_text(json.dumps(sys.argv[1:]))\nsys.exit(3)\n"


@pytest.fixture(autouse=True)
def _real_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fake project whose bench.py and train.py record their arguments and exit with status 3."""
    root = tmp_path / "proj"
    (root / "src" / "fakeproj").mkdir(parents=True)
    (root / "src" / "fakeproj" / "__init__.py").write_text("")
    for module in ("bench", "train"):
        (root / "src" / "fakeproj" / f"{module}.py").write_text(RECORD.replace("argv.json", f"{module}.json"))
    (root / ".amptpl.json").write_text(json.dumps({"package": "fakeproj"}))
    return root


def test_bench_is_python_dash_m_package_bench_with_its_options_passed_verbatim(project):
    argv, env, cwd = build_run_command(project, overrides=["--steps", "5", "model.d_model=64"], bench=True)
    assert argv == [sys.executable, "-m", "fakeproj.bench", "--steps", "5", "model.d_model=64"]
    assert cwd == project.resolve()
    assert env["PYTHONPATH"].split(":")[0] == str(project.resolve() / "src")


def test_run_bench_runs_the_bench_not_the_training_and_exits_with_its_code(project):
    result = cli.invoke(app, ["run", str(project), "--bench", "--steps", "2", "--precisions", "fp32,bf16",
                              "model.d_model=64"])
    assert result.exit_code == 3, result.output
    assert json.loads((project / "bench.json").read_text()) == ["--steps", "2", "--precisions", "fp32,bf16",
                                                                 "model.d_model=64"]
    assert not (project / "train.json").exists()
    assert result.stdout.splitlines()[0].endswith("-m fakeproj.bench --steps 2 --precisions fp32,bf16 model.d_model=64")


def test_run_bench_in_the_project_folder_takes_a_leading_option_as_a_bench_option(project, monkeypatch):
    monkeypatch.chdir(project)
    result = cli.invoke(app, ["run", "--bench", "--steps", "1"])
    assert result.exit_code == 3, result.output
    assert json.loads((project / "bench.json").read_text()) == ["--steps", "1"]


@pytest.mark.parametrize("option", [["--num-processes", "2"], ["--launch-config", "acc.yaml"]])
def test_bench_refuses_a_multi_process_launch_in_one_line(project, option):
    (project / "acc.yaml").write_text("distributed_type: NO\n")
    result = cli.invoke(app, ["run", str(project), "--bench", *option])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["Error: --bench runs one process; drop --launch-config and --num-processes"]
    assert not (project / "bench.json").exists()
    with pytest.raises(AmptplError):
        build_run_command(project, num_processes=2, bench=True)
