"""Tests of the amptpl CLI and the library modules under it (render, add, runner, resources).

They run against the *installed* package (``pip install .``), so the template and presets are the ones the
wheel ships. Everything here is CPU-only and offline; the one multi-process run is marked slow.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import amptpl
from amptpl import render as render_mod
from amptpl import runner as runner_mod
from amptpl.add import SNIPPET, add_core
from amptpl.cli import app
from amptpl.errors import AmptplError
from amptpl.render import LEFTOVER_RE, iter_files, render_project
from amptpl.resources import CONFIGS_ENV, TEMPLATE_ENV, configs_root, template_root
from amptpl.runner import build_run_command

REPO = Path(__file__).resolve().parents[1]
# A fixed, colourless terminal so output does not depend on where the tests run.
TERMINAL = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"}
try:  # click < 8.2 mixes stderr into stdout unless told not to; 8.2 removed the argument
    cli = CliRunner(env=TERMINAL, mix_stderr=False)
except TypeError:
    cli = CliRunner(env=TERMINAL)


@pytest.fixture(autouse=True)
def _real_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test uses the installed template unless it sets the override itself."""
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


def tree(root: Path) -> set[str]:
    """Every path under root, relative: compared before/after to prove nothing was written."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def make_fake_project(root: Path, train_code: str, package: str = "fakeproj") -> Path:
    """A minimal amptpl project: a manifest and src/<package>/train.py."""
    project = root / "proj"
    (project / "src" / package).mkdir(parents=True)
    (project / "src" / package / "__init__.py").write_text("")
    (project / "src" / package / "train.py").write_text(train_code)
    (project / ".amptpl.json").write_text(json.dumps({"package": package}))
    return project


def rendered_sources() -> list[tuple[str, ...]]:
    """Relative parts of every *.jinja file in the installed template."""
    return [parts for parts, _ in iter_files(template_root()) if parts[-1].endswith(".jinja")]


def output_path(project: Path, package: str, parts: tuple[str, ...], example: str = "bytelm") -> Path | None:
    """Where a template file lands in a project of ``example``; None for another example's files."""
    out = render_mod.destination(parts, package, example)
    if out is None:
        return None
    out[-1] = out[-1].removesuffix(".jinja")
    return project.joinpath(*out)


# ---------------------------------------------------------------------------------------------------- new


def test_new_renders_a_project_whose_pyproject_names_it_and_whose_package_has_train_py(tmp_path):
    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    project = tmp_path / "my-proj"
    assert 'name = "my-proj"' in (project / "pyproject.toml").read_text()
    assert (project / "README.md").is_file()
    assert (project / "src" / "my_proj" / "__init__.py").is_file()
    assert (project / "src" / "my_proj" / "train.py").is_file()
    assert (project / "src" / "my_proj" / "amp" / "__init__.py").is_file()
    assert (project / "tests").is_dir()


def test_new_maps_a_dashed_name_to_an_underscored_package_and_renames_src_project(tmp_path):
    render_project("my-proj", tmp_path)
    src = tmp_path / "my-proj" / "src"
    assert sorted(p.name for p in src.iterdir()) == ["my_proj"]


def test_new_writes_amptpl_json_with_version_name_package_answers_and_creation_time(tmp_path):
    render_project("my-proj", tmp_path)
    manifest = json.loads((tmp_path / "my-proj" / ".amptpl.json").read_text())
    assert manifest["template_version"] == amptpl.__version__
    assert manifest["project_name"] == "my-proj"
    assert manifest["package"] == "my_proj"
    assert manifest["answers"] == {"name": "my-proj", "example": "bytelm"}
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None


def test_new_records_a_hash_of_every_file_it_wrote_and_keeps_them_as_the_base_for_update(tmp_path):
    result = render_project("my-proj", tmp_path)
    manifest = json.loads((result.path / ".amptpl.json").read_text())
    written = {p.as_posix() for p in result.files} - {".amptpl.json"}
    assert set(manifest["files"]) == written
    assert manifest["base"] == ".amptpl/base.zip"
    with zipfile.ZipFile(result.path / manifest["base"]) as archive:
        base = {name: archive.read(name) for name in archive.namelist()}
    for rel, digest in manifest["files"].items():
        data = (result.path / rel).read_bytes()
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert base[rel] == data
    assert set(base) == written


def test_new_keeps_the_same_base_archive_bytes_for_the_same_files_whenever_it_runs(tmp_path, monkeypatch):
    first = render_project("my-proj", tmp_path / "a")
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 400 * 86400)  # a render 400 days later
    second = render_project("my-proj", tmp_path / "b")
    archive = Path(".amptpl", "base.zip")
    assert (first.path / archive).read_bytes() == (second.path / archive).read_bytes()


def test_new_leaves_no_jinja_markers_in_any_rendered_file_and_no_jinja_suffix(tmp_path):
    result = render_project("my-proj", tmp_path)
    sources = rendered_sources()
    assert ("pyproject.toml.jinja",) in sources and ("README.md.jinja",) in sources
    for parts in sources:
        out = output_path(result.path, result.package, parts)
        if out is None:  # another example's file, or an example's README part (rendered into README.md)
            continue
        assert out.is_file(), f"{'/'.join(parts)} was not rendered to {out}"
        text = out.read_text()
        # `${{ }}` is a GitHub Actions expression that a workflow may keep through {% raw %}; not Jinja.
        assert not LEFTOVER_RE.search(text), f"{out} still contains a Jinja marker"
        assert "{%" not in text
    assert not any(result.path.rglob("*.jinja"))


def test_new_copies_plain_template_files_and_presets_byte_for_byte(tmp_path):
    result = render_project("my-proj", tmp_path)
    for parts, entry in iter_files(template_root()):
        out = output_path(result.path, "my_proj", parts)
        if out is not None and not parts[-1].endswith(".jinja"):
            assert out.read_bytes() == entry.read_bytes()
    presets = list(iter_files(configs_root()))
    assert presets, "the wheel ships no configs/"
    for parts, entry in presets:
        assert result.path.joinpath("configs", *parts).read_bytes() == entry.read_bytes()


def test_new_skips_caches(tmp_path):
    result = render_project("my-proj", tmp_path)
    names = {p.name for p in result.path.rglob("*")}
    assert not names & {"__pycache__", ".pytest_cache", ".ruff_cache"}
    assert not any(result.path.rglob("*.pyc"))


def test_new_lists_what_it_created_and_prints_next_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["new", "my-proj"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Created my-proj (package my_proj)" in out
    assert "src/my_proj/" in out and "pyproject.toml" in out
    assert "Next steps" in out
    # the README's line: the dev extra brings pytest, so the project's own tests run next
    assert '  pip install -e ".[dev]"\n' in out
    for line in [
        "cd my-proj",
        "python -m my_proj.train",
        "amptpl run my-proj train.max_steps=200",
        "accelerate launch",
    ]:
        assert line in out
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((tmp_path / "my-proj" / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("pytest") for req in extras["dev"])


def test_python_dash_m_amptpl_new_creates_a_project(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "amptpl", "new", "x-proj", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **TERMINAL},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x-proj" / "src" / "x_proj" / "train.py").is_file()


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("my proj", "invalid project name"),
        ("bad-", "invalid project name"),
        ("1abc", "not a Python identifier"),
        ("class", "Python keyword"),
        ("json", "standard-library"),
        ("torch", "shadow"),
        ("accelerate", "shadow"),
        ("amptpl", "shadow"),
        ("safetensors", "shadow"),
        ("huggingface_hub", "shadow"),
        ("huggingface-hub", "shadow"),
        ("Huggingface.Hub", "shadow"),
        ("transformers", "shadow"),
        ("numpy", "shadow"),
        ("pyarrow", "shadow"),
        ("tensorboard", "shadow"),
        ("packaging", "shadow"),
        ("tqdm", "shadow"),
        ("yaml", "shadow"),
        ("pyyaml", "shadow"),
        ("jinja2", "shadow"),
        ("click", "shadow"),
        ("pytest", "shadow"),
        ("wandb", "shadow"),
        ("deepspeed", "shadow"),
        ("ruff", "shadow"),
        ("../escape", "not a path"),
        ("a/b", "not a path"),
    ],
)
def test_new_rejects_a_bad_name_with_one_error_line_exit_2_and_writes_nothing(tmp_path, name, says):
    target_dir = tmp_path / "here"
    target_dir.mkdir()
    result = cli.invoke(app, ["new", name, "--dir", str(target_dir)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert says in line and repr(name) in line
    assert tree(tmp_path) == {"here"}


def test_new_refuses_a_name_too_long_for_a_folder_with_one_line_exit_2(tmp_path):
    result = cli.invoke(app, ["new", "a" * 300, "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert one_error_line(result) == "Error: project name is 300 characters long; use at most 100 (e.g. my-proj)"
    assert tree(tmp_path) == set()


def read_only_folder() -> Path:
    """A folder nobody may create files in, root included (sysfs); skipped where there is none."""
    folder = Path("/sys")
    try:
        (folder / ".amptpl-probe").mkdir()
    except OSError:
        return folder
    (folder / ".amptpl-probe").rmdir()
    pytest.skip("no read-only folder on this machine")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["new", "my-proj", "--dir", "{ro}"], "Error: cannot write the project: {ro}/"),
        (["add", "{ro}/kernel"], "Error: cannot copy the AMP core: {ro}/kernel/amp"),
    ],
    ids=["new", "add"],
)
def test_a_read_only_destination_is_one_line_and_exit_2_like_trainings_out_dir(args, says):
    ro = str(read_only_folder())
    result = cli.invoke(app, [a.format(ro=ro) for a in args])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith(says.format(ro=ro)) and "[Errno" not in line


def test_new_refuses_a_non_empty_target_without_force_and_changes_nothing(tmp_path):
    (tmp_path / "my-proj").mkdir()
    (tmp_path / "my-proj" / "notes.txt").write_text("mine")
    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--force" in one_error_line(result)
    assert tree(tmp_path) == {"my-proj", "my-proj/notes.txt"}


def test_new_refuses_a_target_that_is_a_file(tmp_path):
    (tmp_path / "my-proj").write_text("a file")
    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a directory" in one_error_line(result)
    assert (tmp_path / "my-proj").read_text() == "a file"
    assert tree(tmp_path) == {"my-proj"}


def test_new_renders_into_an_existing_empty_folder_without_force(tmp_path):
    (tmp_path / "my-proj").mkdir()
    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-proj" / "src" / "my_proj" / "train.py").is_file()


def test_new_refuses_every_dependency_in_the_templates_pyproject(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((template_root() / "pyproject.toml.jinja").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.match(r"[A-Za-z0-9._-]+", r).group() for r in requirements}
    assert {"torch", "accelerate", "pyyaml"} <= names
    for name in sorted(names):
        with pytest.raises(AmptplError, match="would shadow"):
            render_project(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_templates_dependencies_are_read_the_same_without_tomllib(monkeypatch):
    """Python 3.10 has no tomllib: the fallback reads the same names from the template's pyproject.toml."""
    with_tomllib = render_mod._template_dependencies()
    assert {"torch", "accelerate", "pyyaml", "pytest"} <= with_tomllib
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now raises ImportError
    assert render_mod._template_dependencies() == with_tomllib


def test_new_refuses_a_name_already_importable_from_this_python(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "zz_amptpl_installed").mkdir(parents=True)
    (site / "zz_amptpl_installed" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    result = cli.invoke(app, ["new", "zz-amptpl-installed", "--dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "would shadow the installed package 'zz_amptpl_installed'" in line
    assert str(site / "zz_amptpl_installed" / "__init__.py") in line
    assert not (tmp_path / "out").exists()


def test_new_force_does_not_count_the_project_itself_as_an_installed_package(tmp_path, monkeypatch):
    """Re-rendering a project that is importable (installed editable, or a folder on sys.path) is allowed."""
    render_project("zz-self", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "zz-self" / "src"))
    monkeypatch.syspath_prepend(str(tmp_path / "zz-self"))  # a plain folder, like the cwd under `python -m`
    result = cli.invoke(app, ["new", "zz-self", "--dir", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output


def test_new_with_force_backs_up_each_file_it_overwrites_and_leaves_identical_and_other_files_alone(tmp_path):
    render_project("my-proj", tmp_path)
    project = tmp_path / "my-proj"
    train, readme, config = project / "src/my_proj/train.py", project / "README.md", project / "src/my_proj/config.py"
    template = {p: p.read_bytes() for p in (train, readme)}
    train.write_text(train.read_text() + "# my edit\n")
    readme.write_text("# My README\n")
    edited = {p: p.read_bytes() for p in (train, readme)}
    (project / "notes.txt").write_text("mine")
    config_inode = config.stat().st_ino

    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    for path in (train, readme):
        assert path.read_bytes() == template[path]
        backup = path.with_name(path.name + ".amptpl-backup")
        assert backup.read_bytes() == edited[path]
        rel = path.relative_to(project).as_posix()
        assert f"  {rel}: overwritten, backup at {rel}.amptpl-backup" in result.stdout.splitlines()
    assert config.stat().st_ino == config_inode  # identical: not rewritten
    assert (project / "notes.txt").read_text() == "mine"
    assert "already identical to the template's, left alone" in result.stdout

    # again: a second backup never replaces the first
    train.write_text("# another edit\n")
    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    assert train.with_name("train.py.amptpl-backup").read_bytes() == edited[train]
    assert train.with_name("train.py.amptpl-backup-2").read_text() == "# another edit\n"


def test_new_force_with_another_example_moves_the_earlier_examples_files_aside_and_says_so(tmp_path):
    render_project("my-proj", tmp_path)  # the byte LM
    project = tmp_path / "my-proj"
    before = sorted(p.name for p in (project / "tests").glob("test_example_*.py"))
    result = cli.invoke(app, ["new", "my-proj", "--dir", str(tmp_path), "--force", "--example", "segmentation"])
    assert result.exit_code == 0, result.output
    now = sorted(p.name for p in (project / "tests").glob("test_example_*.py"))
    assert now == ["test_example_segmentation.py"] and "test_example_segmentation.py" not in before
    for name in before:  # moved aside (pytest does not collect them), and each named
        assert (project / "tests" / f"{name}.amptpl-backup").is_file()
        assert f"  tests/{name}: not in this example's template, moved to tests/{name}.amptpl-backup" in result.stdout
    assert json.loads((project / ".amptpl.json").read_text())["answers"]["example"] == "segmentation"


def test_new_leaves_no_staging_folder_behind(tmp_path):
    render_project("my-proj", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["my-proj"]
    assert not any((tmp_path / "my-proj").rglob("*amptpl-tmp*"))


def test_new_does_not_import_torch_accelerate_or_datasets(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "amptpl", "new", "x", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **TERMINAL},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "amptpl.render" in imported
    heavy = [m for m in imported if m.split(".")[0] in {"torch", "accelerate", "datasets", "evaluate"}]
    assert heavy == []


# ---------------------------------------------------------------------------------------------------- app


def test_amptpl_help_runs_as_a_console_script():
    script = Path(sys.executable).parent / "amptpl"
    if not script.exists():
        script = shutil.which("amptpl")
    if not script:
        pytest.skip("the amptpl console script is not installed next to this Python")
    proc = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env={**os.environ, **TERMINAL}, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("new", "run", "add"):
        assert re.search(rf"\b{command}\b", proc.stdout)


def test_no_arguments_shows_help():
    result = cli.invoke(app, [])
    assert "Usage" in result.output and "new" in result.output


def test_version_prints_the_package_version_which_matches_the_installed_metadata():
    result = cli.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"amptpl {amptpl.__version__}"
    try:
        assert importlib.metadata.version("amptpl") == amptpl.__version__
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("amptpl is not installed; metadata version not checked")


def test_resources_are_loaded_from_the_installed_package_not_the_checkout():
    package_dir = Path(amptpl.__file__).resolve().parent
    if package_dir.is_relative_to(REPO / "cli"):
        pytest.skip("running from source: amptpl is imported from the checkout's cli/")
    direct_url = importlib.metadata.distribution("amptpl").read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("amptpl is installed editable")
    root = Path(str(template_root())).resolve()
    assert root == package_dir / "template"
    assert (root / "pyproject.toml.jinja").is_file()
    assert (root / "src" / "project" / "train.py").is_file()
    assert Path(str(configs_root())).resolve() == package_dir / "configs"


def test_template_root_override_renders_another_template(tmp_path, monkeypatch):
    """AMPTPL_TEMPLATE_ROOT (a development aid) replaces the packaged template."""
    tpl = tmp_path / "tpl"
    (tpl / "src" / "project").mkdir(parents=True)
    (tpl / "hello.txt.jinja").write_text("{{ project_name }} / {{ package }} / {{ amptpl_version }}\n")
    (tpl / "src" / "project" / "train.py").write_text("print('hi')\n")
    monkeypatch.setenv(TEMPLATE_ENV, str(tpl))
    result = render_project("demo-x", tmp_path / "out")
    assert (result.path / "hello.txt").read_text() == f"demo-x / demo_x / {amptpl.__version__}\n"
    assert (result.path / "src" / "demo_x" / "train.py").read_text() == "print('hi')\n"


def test_a_template_that_leaves_a_jinja_marker_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "bad.txt.jinja").write_text("{% raw %}{{ oops }}{% endraw %}\n")
    monkeypatch.setenv(TEMPLATE_ENV, str(tpl))
    (tmp_path / "out").mkdir()
    with pytest.raises(AmptplError, match=re.escape("template bug: template/bad.txt.jinja line 1")):
        render_project("demo", tmp_path / "out")
    assert tree(tmp_path / "out") == set()


def test_a_template_with_an_undefined_variable_is_a_one_line_error(tmp_path, monkeypatch):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "bad.txt.jinja").write_text("{{ not_a_variable }}\n")
    monkeypatch.setenv(TEMPLATE_ENV, str(tpl))
    with pytest.raises(AmptplError, match="not_a_variable") as info:
        render_project("demo", tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------------------------------------------- add


def core_files() -> dict[str, bytes]:
    core = template_root() / "src" / "project" / "amp"
    return {"/".join(parts): entry.read_bytes() for parts, entry in iter_files(core)}


def test_add_copies_the_core_and_records_its_version_and_file_hashes(tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0, result.output
    expected = core_files()
    assert "__init__.py" in expected
    for rel, data in expected.items():
        assert (tmp_path / "amp" / rel).read_bytes() == data
    manifest = json.loads((tmp_path / "amp" / ".amptpl.json").read_text())
    assert manifest["template_version"] == amptpl.__version__
    assert set(manifest["files"]) == set(expected)
    assert all(h.startswith("sha256:") for h in manifest["files"].values())


def test_add_prints_the_lines_to_add_to_the_users_loop(tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0
    assert "Add to your training loop" in result.stdout
    for line in SNIPPET.splitlines():
        assert line in result.stdout


def test_add_returns_the_files_it_wrote(tmp_path):
    result = add_core(tmp_path)
    assert result.path == tmp_path / "amp"
    assert {p.as_posix() for p in result.files} == set(core_files()) | {".amptpl.json"}
    assert result.unchanged == []


def test_add_minimal_copies_the_kernel_alone_and_an_upgrade_keeps_it_so_or_drops_only_unedited_debug_files(tmp_path):
    kernel = {rel for rel in core_files() if not rel.startswith("debug/")}
    mini, full = tmp_path / "mini", tmp_path / "full"
    for folder in (mini, full):
        folder.mkdir()
    result = add_core(mini, minimal=True)
    assert {p.as_posix() for p in result.files} == kernel | {".amptpl.json"}
    assert json.loads((mini / "amp" / ".amptpl.json").read_text())["minimal"] is True
    assert add_core(mini).upgrade is not None and not (mini / "amp" / "debug").exists()  # it stays the kernel
    add_core(full)
    (full / "amp" / "debug" / "audit.py").write_text("# my audit\n")
    add_core(full, minimal=True)  # to the kernel: the debugger's files go, unless you edited them
    assert not (full / "amp" / "debug" / "meters.py").exists()
    assert (full / "amp" / "debug" / "audit.py").read_text() == "# my audit\n"


def test_add_again_accepts_identical_files(tmp_path):
    add_core(tmp_path)
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "already up to date" in result.stdout


def test_a_first_add_refuses_to_overwrite_a_different_file_without_force_and_writes_nothing(tmp_path):
    (tmp_path / "amp").mkdir()
    mine = tmp_path / "amp" / "__init__.py"
    mine.write_text("# my own amp package\n")
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert str(mine) in line and "--force" in line
    assert tree(tmp_path) == {"amp", "amp/__init__.py"}
    assert mine.read_text() == "# my own amp package\n"


def test_a_first_add_with_force_overwrites_a_different_file_and_backs_it_up(tmp_path):
    (tmp_path / "amp").mkdir()
    mine = tmp_path / "amp" / "__init__.py"
    mine.write_text("# my own amp package\n")
    result = cli.invoke(app, ["add", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    assert mine.read_bytes() == core_files()["__init__.py"]
    assert (tmp_path / "amp" / "__init__.py.amptpl-backup").read_text() == "# my own amp package\n"
    assert "  __init__.py: overwritten, backup at __init__.py.amptpl-backup" in result.stdout.splitlines()


def test_add_again_keeps_a_file_you_edited_when_the_core_did_not_change(tmp_path):
    add_core(tmp_path)
    edited = tmp_path / "amp" / "__init__.py"
    edited.write_text("# my edit\n")
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert edited.read_text() == "# my edit\n"
    assert any("__init__.py" in line and "keep yours" in line for line in result.stdout.splitlines())


def test_add_refuses_a_destination_that_does_not_exist(tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in one_error_line(result)
    assert tree(tmp_path) == set()


# ---------------------------------------------------------------------------------------------------- run


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fake project whose train.py records its arguments and exits with status 3."""
    return make_fake_project(
        tmp_path,
        "import json, pathlib, sys\n"
        "pathlib.Path('argv.json').write_text(json.dumps(sys.argv[1:]))\n"
        "sys.exit(3)\n",
    )


def test_run_direct_is_python_dash_m_package_train_with_src_on_pythonpath(project):
    argv, env, cwd = build_run_command(project, overrides=["train.max_steps=200"])
    assert argv == [sys.executable, "-m", "fakeproj.train", "train.max_steps=200"]
    assert cwd == project.resolve()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(project.resolve() / "src")


def test_run_keeps_an_existing_pythonpath_after_the_project_src(project, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    _, env, _ = build_run_command(project)
    assert env["PYTHONPATH"] == os.pathsep.join([str(project.resolve() / "src"), "/elsewhere"])


def test_run_with_launch_config_uses_accelerate_launch_and_resolves_the_file_from_the_cwd_first(
    project, tmp_path, monkeypatch
):
    (tmp_path / "acc.yaml").write_text("distributed_type: NO\n")
    (project / "acc.yaml").write_text("distributed_type: NO\n")
    monkeypatch.chdir(tmp_path)
    argv, _, _ = build_run_command(project, launch_config="acc.yaml", overrides=["a=1"])
    assert argv == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str((tmp_path / "acc.yaml").resolve()),
        "-m", "fakeproj.train", "a=1",
    ]  # fmt: skip


def test_run_with_launch_config_falls_back_to_the_project_dir(project, tmp_path, monkeypatch):
    (project / "configs" / "accelerate").mkdir(parents=True)
    (project / "configs" / "accelerate" / "x.yaml").write_text("distributed_type: NO\n")
    monkeypatch.chdir(tmp_path)
    argv, _, _ = build_run_command(project, launch_config="configs/accelerate/x.yaml")
    assert argv[argv.index("--config_file") + 1] == str((project / "configs/accelerate/x.yaml").resolve())


def test_run_with_num_processes_on_cpu_launches_multi_gpu_with_accelerate_use_cpu(project, monkeypatch):
    monkeypatch.setattr(runner_mod, "cuda_device_count", lambda: 0)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    argv, env, _ = build_run_command(project, num_processes=2, overrides=["a=1"])
    assert argv == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--multi_gpu", "-m", "fakeproj.train", "a=1",
    ]  # fmt: skip
    # `--cpu --num_processes 2` would silently start one process; --multi_gpu + this starts two gloo ranks.
    assert env["ACCELERATE_USE_CPU"] == "1"
    assert "--cpu" not in argv


def test_run_with_num_processes_on_gpus_does_not_force_cpu(project, monkeypatch):
    monkeypatch.setattr(runner_mod, "cuda_device_count", lambda: 2)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    argv, env, _ = build_run_command(project, num_processes=2)
    assert "--multi_gpu" in argv and "ACCELERATE_USE_CPU" not in env


def test_run_with_one_process_does_not_ask_for_multi_gpu(project, monkeypatch):
    monkeypatch.setattr(runner_mod, "cuda_device_count", lambda: 0)
    argv, env, _ = build_run_command(project, num_processes=1)
    assert "--multi_gpu" not in argv and env["ACCELERATE_USE_CPU"] == "1"


def test_run_outside_an_amptpl_project_names_the_missing_manifest(tmp_path):
    with pytest.raises(AmptplError) as info:
        build_run_command(tmp_path)
    assert str(info.value) == f"not an amptpl project: {tmp_path.resolve() / '.amptpl.json'} not found"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"launch_config": "missing.yaml"}, "launch config not found: missing.yaml"),
        ({"launch_config": "x.yaml", "num_processes": 2}, "cannot be used together"),
        ({"num_processes": 0}, "at least 1"),
        ({"overrides": ["train.max_steps"]}, "'train.max_steps' is not a key=value override"),
        ({"overrides": ["=3"]}, "is not a key=value override"),
    ],
)
def test_run_rejects_bad_options_naming_the_problem(project, kwargs, says):
    with pytest.raises(AmptplError, match=re.escape(says)):
        build_run_command(project, **kwargs)


def test_run_outside_an_amptpl_project_is_one_error_line_and_exit_2(tmp_path):
    result = cli.invoke(app, ["run", str(tmp_path), "a=1"])
    assert result.exit_code == 2
    assert "not an amptpl project" in one_error_line(result)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--launch-config", "missing.yaml"], "launch config not found: missing.yaml"),
        (["--launch-config", "x.yaml", "--num-processes", "2"], "cannot be used together"),
        (["--num-processes", "0"], "at least 1"),
        (["a=1", "oops"], "'oops' is not a key=value override"),
        (["--no-such-flag"], "'--no-such-flag' is not a key=value override"),
    ],
)
def test_run_bad_input_is_one_error_line_and_exit_2_and_runs_nothing(project, args, says):
    result = cli.invoke(app, ["run", str(project), *args])
    assert result.exit_code == 2
    assert says in one_error_line(result)
    assert not (project / "argv.json").exists()


def test_run_of_a_file_says_it_is_not_a_project_directory():
    result = cli.invoke(app, ["run", "/etc/passwd"])
    assert result.exit_code == 2
    assert one_error_line(result) == "Error: project directory /etc/passwd is a file, not a project directory"


# accelerate configs that `accelerate launch` stops on, as users break them: (file text, what the line says)
BROKEN_LAUNCH_CONFIGS = [
    ("distributed_type: [MULTI_GPU\n", "cannot use it (ParserError"),
    ("distributed_type: BOGUS_TYPE\nnum_processes: 2\n", "'BOGUS_TYPE' is not a valid DistributedType"),
    ("distributed_type: MULTI_GPU\nnum_processes: many\n", "num_processes: must be a whole number, got 'many'"),
    ("distributed_type: NO\nmixed_precision: fp64\n", "mixed_precision: must be one of no, fp16, bf16, fp8"),
    ("num_processes: 2\n", "distributed_type: missing"),
    ("distributed_type: NO\nnum_procs: 2\n", "unknown keys (['num_procs'])"),
    ("- a list\n", "expected a mapping of settings"),
]


@pytest.mark.parametrize(("text", "says"), BROKEN_LAUNCH_CONFIGS)
def test_run_with_a_launch_config_accelerate_cannot_use_is_one_line_naming_the_file_exit_2(
    project, tmp_path, text, says
):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = cli.invoke(app, ["run", str(project), "--launch-config", str(config)])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith(f"Error: {config}: accelerate launch cannot use it (") and says in line
    assert not (project / "argv.json").exists()


def test_run_with_num_processes_and_a_broken_default_accelerate_config_names_that_file(project, tmp_path, monkeypatch):
    """`accelerate launch` without --config_file reads the default config under HF_HOME and stops on it."""
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("distributed_type: BOGUS_TYPE\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = cli.invoke(app, ["run", str(project), "--num-processes", "2"])
    assert result.exit_code == 2, result.output
    assert one_error_line(result).startswith(f"Error: {config}: accelerate launch cannot use it (ValueError: ")
    assert not (project / "argv.json").exists()


def test_run_with_a_multi_cpu_launch_config_warns_that_it_starts_one_process(tmp_path):
    project = make_fake_project(
        tmp_path, "import os, pathlib\npathlib.Path('world_size').write_text(os.environ.get('WORLD_SIZE', '1'))\n"
    )
    config = tmp_path / "cpu.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    result = cli.invoke(app, ["run", str(project), "--launch-config", str(config)])
    assert result.exit_code == 0, result.output  # it ran: the trap is a warning, as in doctor
    assert (project / "world_size").read_text() == "1"  # the trap is real: one process
    assert "warning: the accelerate config says MULTI_CPU with use_cpu: true and num_processes=2, but " \
        "`accelerate launch` starts ONE process" in result.stderr


def test_run_propagates_the_training_exit_code_and_passes_overrides_verbatim(project):
    result = cli.invoke(app, ["run", str(project), "train.max_steps=200", "amp.precision=fp16"])
    assert result.exit_code == 3
    assert json.loads((project / "argv.json").read_text()) == ["train.max_steps=200", "amp.precision=fp16"]
    echoed = result.stdout.splitlines()[0]
    assert echoed.endswith("-m fakeproj.train train.max_steps=200 amp.precision=fp16")


def test_run_treats_a_first_argument_with_equals_as_an_override_for_the_current_project(project, monkeypatch):
    monkeypatch.chdir(project)
    result = cli.invoke(app, ["run", "train.max_steps=5"])
    assert result.exit_code == 3
    assert json.loads((project / "argv.json").read_text()) == ["train.max_steps=5"]


@pytest.mark.slow
def test_run_with_two_processes_on_cpu_starts_two_real_ranks(tmp_path):
    project = make_fake_project(
        tmp_path,
        "import os, pathlib\n"
        "pathlib.Path(f\"rank{os.environ['RANK']}-of-{os.environ['WORLD_SIZE']}\").write_text('ok')\n",
    )
    env = {**os.environ, **TERMINAL}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        [sys.executable, "-m", "amptpl", "run", str(project), "--num-processes", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if runner_mod.cuda_device_count() == 0:
        assert "ACCELERATE_USE_CPU=1" in proc.stdout
    assert sorted(p.name for p in project.glob("rank*")) == ["rank0-of-2", "rank1-of-2"]


# ------------------------------------------------------------------------------------------------- CI files


def test_the_repos_ci_workflow_is_valid_yaml():
    path = REPO / ".github" / "workflows" / "ci.yml"
    workflow = yaml.safe_load(path.read_text())
    assert isinstance(workflow, dict) and workflow.get("jobs")
    assert "make test" in path.read_text()


def test_the_generated_projects_ci_workflow_is_valid_yaml(tmp_path):
    result = render_project("my-proj", tmp_path)
    text = (result.path / ".github" / "workflows" / "ci.yml").read_text()
    workflow = yaml.safe_load(text)
    assert isinstance(workflow, dict) and workflow.get("jobs")
    assert "pytest" in text and "my_proj" in text


def test_the_amp_core_carries_the_amptpl_version_it_ships_with():
    """Checkpoints record amp.__version__ as the amptpl version the core came from: the two must be one number."""
    core_init = Path(str(template_root())) / "src" / "project" / "amp" / "__init__.py"
    found = re.search(r'^__version__ = "([^"]+)"', core_init.read_text(), flags=re.M)
    assert found and found.group(1) == amptpl.__version__


# ----------------------------------------------------------------------------
# --example: what the project trains


def test_new_help_lists_every_example_and_each_renders_only_its_own_example(tmp_path):
    from amptpl.render import examples

    assert examples()[0] == "bytelm" and len(examples()) >= 2
    help_text = " ".join(cli.invoke(app, ["new", "--help"], env={"COLUMNS": "200"}).stdout.split())
    for name in examples():
        assert name in help_text
        result = cli.invoke(app, ["new", f"p-{name}", "--dir", str(tmp_path), "--example", name])
        assert result.exit_code == 0, result.output
        project = tmp_path / f"p-{name}"
        assert json.loads((project / ".amptpl.json").read_text())["answers"]["example"] == name
        assert (project / "src" / f"p_{name}" / "example" / "__init__.py").is_file()
        assert not (project / "examples").exists() and not (project / "src" / f"p_{name}" / "examples").exists()
        init = (project / "src" / f"p_{name}" / "example" / "__init__.py").read_text()
        assert f'NAME = "{name}"' in init


def test_new_refuses_an_unknown_example_with_one_line_exit_2_and_writes_nothing(tmp_path):
    result = cli.invoke(app, ["new", "proj", "--dir", str(tmp_path), "--example", "gan"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "--example 'gan'" in line and "bytelm" in line and "segmentation" in line
    assert not (tmp_path / "proj").exists()
