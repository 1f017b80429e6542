"""How amptpl is packaged and installed.

- amptpl itself depends on typer, rich, jinja2 and pyyaml only, so ``pipx install amptpl`` stays small; the
  ``train`` extra is a generated project's training stack, with the project's own floors; ``dev`` adds the tools.
- The wheel ships LICENSE and ``py.typed`` (amptpl's and the template's); a generated project has its own
  LICENSE, CHANGELOG.md and ``py.typed``, and its wheel ships them.
- ``amptpl run`` trains with the project's Python (``PROJECT/.venv`` when there is one) and refuses, in one
  line and before starting anything, a Python that cannot import torch and accelerate.
- Shell completion: ``amptpl --show-completion bash``.

The metadata tests read the installed distribution (tests run against the installed wheel); the wheel tests
build one from this checkout. The light install (slow) makes a fresh venv and installs that wheel from the
package index, skipping only when no index answers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

import amptpl
from amptpl.cli import app
from amptpl.render import render_project
from amptpl.resources import CONFIGS_ENV, TEMPLATE_ENV
from amptpl.runner import build_run_command

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"}
try:  # click < 8.2 mixes stderr into stdout unless told not to; 8.2 removed the argument
    cli = CliRunner(env=TERMINAL, mix_stderr=False)
except TypeError:
    cli = CliRunner(env=TERMINAL)

LIGHT = {"typer", "rich", "jinja2", "pyyaml"}
TRAINING_STACK = {"torch", "accelerate", "datasets", "evaluate"}
# records the Python it runs under and exits 3: a run that started leaves python.json behind
RECORD = "import json, pathlib, sys\npathlib.Path('python.json').write_text(json.dumps(sys.executable))\nsys.exit(3)\n"


@pytest.fixture(autouse=True)
def _real_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    """The installed amptpl's requirements: the plain ones, or those of one extra; by canonical name."""
    found = {}
    for line in importlib.metadata.requires("amptpl") or []:
        req = Requirement(line)
        wanted = req.marker is None if extra is None else req.marker is not None and req.marker.evaluate({"extra": extra})
        if wanted:
            found[canonicalize_name(req.name)] = req
    return found


def project_requirements(project: Path) -> dict[str, Requirement]:
    """A generated project's dependencies plus its test extra, by canonical name."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["test"]]
    return {canonicalize_name(r.name): r for r in reqs}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return render_project("typed-proj", tmp_path_factory.mktemp("gen")).path


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel --no-deps`` of ``source`` into ``out``: the build a user's ``pip install`` does."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """amptpl's wheel, built from this checkout."""
    return build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def release_dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as `make release-check` builds them (`python -m build`), with the
    build backend of this Python instead of a downloaded one."""
    for module in ("build", "hatchling"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (it is in the dev extra: pip install build hatchling)")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (built,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": built}


def source_version(path: Path) -> str:
    """The ``__version__ = "..."`` of a file in this checkout."""
    found = re.search(r'^__version__ = "([^"]+)"', path.read_text(), flags=re.M)
    assert found, f"{path} has no __version__ line"
    return found.group(1)


def workflow(name: str) -> dict:
    return yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())


def step_named(job: dict, start: str) -> dict:
    (step,) = [s for s in job["steps"] if s.get("name", "").startswith(start)]
    return step


def run_step(step: dict, cwd: Path, tag: str) -> subprocess.CompletedProcess:
    """A workflow step's script as GitHub runs it on a tag push (`bash -e`, GITHUB_REF_NAME the tag)."""
    env = {**os.environ, "GITHUB_REF_NAME": tag, "GITHUB_REF": f"refs/tags/{tag}"}
    return subprocess.run(["bash", "-e", "-c", step["run"]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ metadata


def test_amptpl_itself_depends_only_on_typer_rich_jinja2_and_pyyaml():
    assert set(requirements()) == LIGHT


def test_the_train_extra_holds_each_dependency_of_a_generated_project_with_the_same_floor(generated):
    """`pip install "amptpl[train]"` gives a Python that `amptpl run` can train any generated project with."""
    offered = {**requirements(), **requirements("train")}
    assert TRAINING_STACK <= set(requirements("train"))
    for name, req in project_requirements(generated).items():
        assert name in offered, f"the project needs {req}; amptpl[train] lacks it"
        assert offered[name].specifier == req.specifier, f"project: {req}, amptpl: {offered[name]}"


def test_the_dev_extra_pulls_in_the_train_extra_and_the_tools_amptpls_tests_use():
    dev = requirements("dev")
    train = requirements("train")
    if "amptpl" in dev:  # the self-reference kept as written (`amptpl[train]`): pip resolves it to the extra
        assert "train" in dev["amptpl"].extras
    else:  # expanded by the build backend into the train extra's own requirements
        assert set(train) <= set(dev)
        assert all(dev[name].specifier == req.specifier for name, req in train.items())
    assert {"pytest", "ruff", "tensorboard", "build", "twine", "hatchling"} <= set(dev)


def test_the_minimum_versions_ci_job_installs_exactly_the_floors_a_project_declares(generated):
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    steps = workflow["jobs"]["minimum-versions"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    pins = {canonicalize_name(n): v for n, v in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", script)}
    assert "accelerate" in pins and "datasets" in pins and "evaluate" in pins
    declared = project_requirements(generated)
    for name, version in pins.items():
        assert name in declared, f"CI pins {name}=={version}, which a generated project does not depend on"
        floor = declared[name].specifier
        assert floor == SpecifierSet(f">={version}"), f"CI pins {name}=={version}; the project declares {name}{floor}"
    flat = " ".join(script.replace('"', "").replace("\\\n", " ").split())
    assert "amptpl new minproj" in flat and "-e $RUNNER_TEMP/minproj[test]" in flat
    assert "-m pytest -q -m not slow" in flat


# ---------------------------------------------------------------------------------------------------- wheel


def test_the_wheel_ships_the_license_and_py_typed_for_amptpl_and_for_the_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"amptpl-{amptpl.__version__}.dist-info"
    assert {"amptpl/py.typed", "amptpl/template/src/project/py.typed", f"{dist_info}/licenses/LICENSE"} <= names
    assert {"amptpl/template/LICENSE.jinja", "amptpl/template/CHANGELOG.md.jinja"} <= names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "Classifier: Typing :: Typed" in metadata.splitlines()


# what a generated project is made of: the core, its debugger, the default example and the core's own tests
SHIPPED = [
    "amptpl/template/src/project/amp/session.py",
    "amptpl/template/src/project/amp/debug/audit.py",
    "amptpl/template/examples/bytelm/example/model.py",
    "amptpl/template/tests/core/tiny_loop.py.jinja",
    "amptpl/configs/fp16.yaml",
]


def test_the_wheel_carries_the_template_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [name for name in SHIPPED if name not in names] == []


def test_the_release_wheel_built_from_the_sdist_carries_the_template_and_the_configs(release_dist):
    names = set(zipfile.ZipFile(release_dist["wheel"]).namelist())
    assert [name for name in SHIPPED if name not in names] == []
    assert release_dist["wheel"].name == f"amptpl-{amptpl.__version__}-py3-none-any.whl"
    assert release_dist["sdist"].name == f"amptpl-{amptpl.__version__}.tar.gz"


def test_twine_check_passes_on_the_sdist_and_the_wheel(release_dist):
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed (it is in the dev extra: pip install twine)")
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(release_dist["sdist"]), str(release_dist["wheel"])],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_the_license_is_mit_for_the_amptpl_authors():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the amptpl authors\n")


# ---------------------------------------------------------------------------------------------------- release


def test_the_amp_core_in_this_checkout_carries_amptpls_version():
    """A release bumps both: a checkpoint records the core's __version__ as the amptpl release it comes from."""
    core = source_version(REPO / "template" / "src" / "project" / "amp" / "__init__.py")
    assert core == source_version(REPO / "cli" / "amptpl" / "__init__.py")


def test_the_release_workflow_runs_on_v_tags_and_only_its_publish_job_uploads_by_trusted_publishing():
    wf = workflow("release.yml")
    assert wf.get("on", wf.get(True)) == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads a bare `on` as true
    assert "id-token" not in (wf.get("permissions") or {})
    publish = [(name, job) for name, job in wf["jobs"].items()
               if any("pypa/gh-action-pypi-publish" in s.get("uses", "") for s in job["steps"])]  # fmt: skip
    assert len(publish) == 1, publish
    name, job = publish[0]
    assert job["permissions"] == {"id-token": "write"}
    environment = job["environment"]
    assert (environment["name"] if isinstance(environment, dict) else environment) == "pypi"
    assert [s.get("uses", "").split("@")[0] for s in job["steps"]] == [
        "actions/download-artifact", "pypa/gh-action-pypi-publish"]  # fmt: skip
    (build,) = [other for other_name, other in wf["jobs"].items() if other_name != name]
    assert job["needs"] in ("build", ["build"]) and wf["jobs"]["build"] is build
    assert "permissions" not in build
    scripts = "\n".join(s.get("run", "") for s in build["steps"])
    assert "make release-check" in scripts and "upload" not in scripts
    python = [s["with"]["python-version"] for s in build["steps"] if s.get("uses", "").startswith("actions/setup-python")]
    assert python == ["3.11"]
    (upload,) = [s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["with"]["name"] == "dist" and upload["with"]["path"].rstrip("/") == "dist"


def test_make_release_check_builds_twine_checks_and_scaffolds_from_the_wheel_and_ci_runs_it_but_not_make_test():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^release-check:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe, "the Makefile has no release-check target"
    body = recipe.group(1)
    for piece in ["pip install -q build twine", "-m build --outdir dist", "twine check --strict dist/*",
                  "pip install -q dist/*.whl", "amptpl --version", "amptpl --help", "amptpl new smoke"]:  # fmt: skip
        assert piece in body, piece
    assert "upload" not in body
    test_target = re.search(r"^test:(.*)$", makefile, flags=re.M).group(1)
    assert "release-check" not in test_target
    assert "release-check" not in (REPO / ".ci" / "run").read_text()
    ci = workflow("ci.yml")
    runs = [name for name, job in ci["jobs"].items() if any(s.get("run") == "make release-check" for s in job["steps"])]
    assert runs == ["release-check"]
    assert not any("pypi-publish" in s.get("uses", "") for job in ci["jobs"].values() for s in job["steps"])


def test_the_release_refuses_a_tag_other_than_v_and_the_version_in_one_line_naming_both():
    step = step_named(workflow("release.yml")["jobs"]["build"], "The tag is")
    version = source_version(REPO / "cli" / "amptpl" / "__init__.py")
    ok = run_step(step, REPO, f"v{version}")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    for tag in ["v9.9.9", version, f"v{version}.1"]:
        refused = run_step(step, REPO, tag)
        assert refused.returncode == 1
        (line,) = (refused.stdout + refused.stderr).splitlines()
        assert f"tag {tag} " in line and f'__version__ = "{version}"' in line, line


def test_the_release_refuses_a_tag_without_its_changelog_section_in_one_line(tmp_path):
    step = step_named(workflow("release.yml")["jobs"]["build"], "CHANGELOG.md has")
    (tmp_path / "CHANGELOG.md").write_text(
        "# Changelog\n\n## [Unreleased]\n\n## [1.2.3] - 2026-01-02\n\n- Mentions ## [1.4.0] in passing.\n"
    )
    ok = run_step(step, tmp_path, "v1.2.3")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", ""), ok.stdout
    for tag in ["v1.2.4", "v1.2", "v1.4.0"]:
        refused = run_step(step, tmp_path, tag)
        assert refused.returncode == 1
        (line,) = (refused.stdout + refused.stderr).splitlines()
        assert f'"## [{tag[1:]}]"' in line and f"tag {tag}" in line, line


# ----------------------------------------------------------------------------------------- generated project


def test_a_generated_project_has_an_mit_license_naming_it_a_changelog_and_py_typed(generated):
    assert (generated / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) the typed-proj authors\n")
    changelog = (generated / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog\n") and "## [Unreleased]" in changelog and "src/typed_proj/amp/" in changelog
    assert (generated / "src" / "typed_proj" / "py.typed").read_bytes() == b""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((generated / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["*"]


@pytest.mark.slow
def test_a_generated_projects_wheel_ships_its_py_typed_and_license(generated, tmp_path):
    names = set(zipfile.ZipFile(build_wheel(generated, tmp_path)).namelist())
    assert "typed_proj/py.typed" in names
    assert "typed_proj-0.1.0.dist-info/licenses/LICENSE" in names


# ------------------------------------------------------------------------------------------------ completion


def test_show_completion_prints_a_bash_completion_script_for_amptpl():
    proc = subprocess.run(
        [sys.executable, "-m", "amptpl", "--show-completion", "bash"],
        capture_output=True, text=True, check=False,
        env={**os.environ, **TERMINAL, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "_AMPTPL_COMPLETE=complete_bash" in proc.stdout
    assert re.search(r"^complete .*\bamptpl$", proc.stdout, re.M), proc.stdout


def test_help_offers_install_completion_and_show_completion():
    result = cli.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


# ------------------------------------------------------------------------------- amptpl run: the project's Python


def fake_project(root: Path) -> Path:
    project = root / "proj"
    (project / "src" / "fakeproj").mkdir(parents=True)
    (project / "src" / "fakeproj" / "__init__.py").write_text("")
    (project / "src" / "fakeproj" / "train.py").write_text(RECORD)
    (project / ".amptpl.json").write_text(json.dumps({"package": "fakeproj"}))
    return project


def make_venv(path: Path, see_this_pythons_packages: bool) -> Path:
    """A bare venv (no pip) at ``path``; with ``see_this_pythons_packages``, a .pth file puts this Python's
    site-packages (torch, accelerate) on its path. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    if see_this_pythons_packages:
        site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
        here = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (site / "this-pythons-packages.pth").write_text("\n".join(sorted(here)) + "\n")
    return path / "bin" / "python"


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("module", "code", "says"),
    [
        ("torch", "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n",
         "is not installed for {python} (torch: ModuleNotFoundError: No module named 'torch')"),
        ("accelerate", "raise ModuleNotFoundError(\"No module named 'accelerate'\", name='accelerate')\n",
         "is not installed for {python} (accelerate: ModuleNotFoundError: No module named 'accelerate')"),
        ("torch", "raise RuntimeError('libtorch_cpu.so: cannot open shared object file')\n",
         "does not import with {python} (torch: RuntimeError: libtorch_cpu.so: cannot open shared object file)"),
    ],
    ids=["torch-missing", "accelerate-missing", "torch-broken"],
)
def test_run_refuses_a_python_without_the_training_stack_in_one_line_exit_2_and_starts_nothing(
    tmp_path, monkeypatch, module, code, says
):
    project = fake_project(tmp_path)
    (tmp_path / "shadow" / module).mkdir(parents=True)
    (tmp_path / "shadow" / module / "__init__.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    result = cli.invoke(app, ["run", str(project), "train.max_steps=5"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "the project's training stack " + says.format(python=sys.executable) in line
    assert f"run `{sys.executable} -m pip install -e {project.resolve()}`" in line
    assert 'pip install ".[train]" in amptpl\'s checkout' in line
    assert f"or make {project.resolve() / '.venv'} with it" in line
    assert result.stdout == ""  # not even the command line: nothing was started
    assert not (project / "python.json").exists()


def test_run_uses_the_projects_own_venv_python_when_it_has_one(tmp_path):
    project = fake_project(tmp_path)
    python = make_venv(project / ".venv", see_this_pythons_packages=True)
    argv, _, _ = build_run_command(project, overrides=["a=1"])
    assert argv == [str(python), "-m", "fakeproj.train", "a=1"]
    argv, _, _ = build_run_command(project, launch_config=None, num_processes=1)
    assert argv[:3] == [str(python), "-m", "accelerate.commands.launch"]
    result = cli.invoke(app, ["run", str(project), "a=1"])
    assert result.exit_code == 3, result.output + result.stderr
    assert json.loads((project / "python.json").read_text()) == str(python)


def test_run_refuses_a_project_venv_without_torch_and_names_that_python(tmp_path):
    project = fake_project(tmp_path)
    python = make_venv(project / ".venv", see_this_pythons_packages=False)
    result = cli.invoke(app, ["run", str(project)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"is not installed for {python} (torch: ModuleNotFoundError" in line
    assert f"run `{python} -m pip install -e {project.resolve()}`" in line
    assert not (project / "python.json").exists()


# ------------------------------------------------------------------------------------------- light install


def in_venv(venv: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **TERMINAL}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          cwd=venv.parent, timeout=timeout, check=False)  # fmt: skip


@pytest.mark.slow
def test_the_wheel_installs_light_into_a_fresh_venv_and_scaffolds_there_without_torch(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    probe = in_venv(venv, "python", "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "probe"), "typer",
                    timeout=120)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable from this machine: {probe.stderr.strip()[-300:]}")

    install = in_venv(venv, "python", "-m", "pip", "install", "-q", str(wheel))
    assert install.returncode == 0, install.stderr[-3000:]
    listed = json.loads(in_venv(venv, "python", "-m", "pip", "list", "--format=json").stdout)
    names = {canonicalize_name(p["name"]) for p in listed}
    assert LIGHT | {"amptpl"} <= names
    heavy = {n for n in names if n in TRAINING_STACK | {"numpy", "pyarrow"} or n.startswith("nvidia-")}
    assert heavy == set(), f"a light install pulled in {sorted(heavy)}"

    version = in_venv(venv, "amptpl", "--version")
    assert version.stdout.strip() == f"amptpl {amptpl.__version__}", version.stderr
    new = in_venv(venv, "amptpl", "new", "demo", "--dir", str(tmp_path))
    assert new.returncode == 0, new.stderr
    assert (tmp_path / "demo" / "src" / "demo" / "train.py").is_file()
    run = in_venv(venv, "amptpl", "run", str(tmp_path / "demo"))
    assert run.returncode == 2
    assert f"the project's training stack is not installed for {venv / 'bin' / 'python'}" in run.stderr
