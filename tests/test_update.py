"""`amptpl update` (three-way merge against the recorded base), `amptpl add` upgrades, and their dry runs.

A project is rendered from an *older* template (a copy of the installed one with a few files changed, one
added and one removed), the user edits it, and `amptpl update` brings it to today's template. Everything runs
against the installed wheel, offline; the run of the updated project's own tests is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import TERMINAL, cli, one_error_line

import amptpl
from amptpl.add import add_core
from amptpl.cli import app
from amptpl.manifest import sha256
from amptpl.merge import merge3
from amptpl.render import SKIP_DIRS, plan_files, render_project
from amptpl.resources import CONFIGS_ENV, TEMPLATE_ENV, template_root

NAME, PKG = "upd-proj", "upd_proj"
HAS_GIT = shutil.which("git") is not None


@pytest.fixture(autouse=True)
def _real_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test uses the installed template unless it sets the override itself."""
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: compared before/after to prove what was (not) written."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def base_files(root: Path) -> dict[str, bytes]:
    """The files of the base amptpl keeps in ``root/.amptpl/base.zip``, with their bytes."""
    with zipfile.ZipFile(root / ".amptpl" / "base.zip") as archive:
        return {name: archive.read(name) for name in sorted(archive.namelist())}


def copy_template(dest: Path) -> Path:
    shutil.copytree(Path(str(template_root())), dest, ignore=shutil.ignore_patterns(*SKIP_DIRS, "*.pyc"))
    return dest


def edit(path: Path, change) -> None:
    path.write_text(change(path.read_text()))


def first_line(change):
    """An edit of the first line only: the same lines as any other first-line edit (a real conflict)."""
    return lambda text: change(text.split("\n", 1)[0]) + "\n" + text.split("\n", 1)[1]


# ---------------------------------------------------------------------------------------------------- scenario
# What the older template had, what the user did, and what `amptpl update` must do about it, per file.
# (path in the project, action shown in the plan, what the file must hold afterwards)
#   old -> the file as the older template rendered it; user -> after the user's edits; today -> today's render


def _added_test_file() -> str:
    """A test module today's template has; the older template lacks it (a new template file)."""
    names = sorted(p.name for p in Path(str(template_root()), "tests").iterdir() if p.name.startswith("test_"))
    name = next(n for n in names if not n.startswith("test_config"))
    return "tests/" + name.removesuffix(".jinja")


ADDED = _added_test_file()
CASES = [
    # not touched by the user, changed by the template: replaced by today's version
    (f"src/{PKG}/export.py", "replace", "today"),
    # edited by the user, not changed by the template: kept
    (f"src/{PKG}/example/model.py", "keep yours", "user"),
    # edited by the user at the top, changed by the template at the bottom: merged cleanly
    (f"src/{PKG}/train.py", "merge", "merged"),
    # edited by both on the same (first) line: conflict markers
    ("README.md", "conflict", "conflict"),
    # in today's template only: added
    (ADDED, "add", "today"),
    # deleted by the user: stays deleted
    (".github/workflows/ci.yml", "stay deleted", None),
    # dropped by the template, never touched by the user: removed (its emptied folder too)
    ("tools/legacy.py", "remove", None),
    # dropped by the template, edited by the user: kept
    ("docs/notes.md", "keep (template dropped it)", "user"),
]


def make_old_template(dest: Path) -> Path:
    tpl = copy_template(dest)
    edit(tpl / "src/project/export.py", lambda t: t + "# helper the older template had\n")
    edit(tpl / "src/project/train.py", lambda t: t + "# a trailing note the older template had\n")
    edit(tpl / "README.md.jinja", first_line(lambda line: line + " (older title)"))
    (tpl / "tools").mkdir()
    (tpl / "tools/legacy.py").write_text("# a helper today's template dropped\n")
    (tpl / "docs").mkdir()
    (tpl / "docs/notes.md").write_text("Notes the older template had.\n")
    source = tpl / (ADDED + ".jinja") if (tpl / (ADDED + ".jinja")).exists() else tpl / ADDED
    source.unlink()
    return tpl


def user_edits(project: Path) -> None:
    edit(project / f"src/{PKG}/example/model.py", lambda t: t + "# my tweak\n")
    edit(project / f"src/{PKG}/train.py", lambda t: "# my note at the top\n" + t)
    edit(project / "README.md", first_line(lambda line: "# My own title"))
    (project / ".github/workflows/ci.yml").unlink()
    edit(project / "docs/notes.md", lambda t: t + "My own notes.\n")


@dataclass
class Scenario:
    project: Path
    before: dict[str, bytes]  # the whole project (base and manifest included) just before the update
    today: dict[str, bytes]  # today's render, by path


def make_scenario(root: Path, git: bool = False) -> Scenario:
    tpl = make_old_template(root / "old-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEMPLATE_ENV, str(tpl))
        render_project(NAME, root)
    project = root / NAME
    if git:
        git_commit(project)
    user_edits(project)
    today = {rel.as_posix(): item.data for rel, item in plan_files(NAME, PKG).items()}
    return Scenario(project, snapshot(project), today)


def expected(scenario: Scenario, path: str, what: str | None) -> bytes | None:
    if what == "today":
        return scenario.today[path]
    if what == "user":
        return scenario.before[path]
    if what == "merged":
        return b"# my note at the top\n" + scenario.today[path]
    return None


def git(project: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(project.parent)}  # fmt: skip
    subprocess.run(["git", *args], cwd=project, env=env, check=True, capture_output=True)


def git_commit(project: Path) -> None:
    if not (project / ".git").exists():
        git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "state")


@pytest.fixture(scope="module")
def updated(tmp_path_factory):
    """One scenario, updated once: (scenario, CLI result)."""
    scenario = make_scenario(tmp_path_factory.mktemp("updated"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(TEMPLATE_ENV, raising=False)
        mp.delenv(CONFIGS_ENV, raising=False)
        result = cli.invoke(app, ["update", str(scenario.project)])
    return scenario, result


@pytest.mark.parametrize(("path", "action", "content"), CASES, ids=[c[1] for c in CASES])
def test_update_decides_each_file_by_who_changed_it(updated, path, action, content):
    scenario, result = updated
    row = next((line for line in result.stdout.splitlines() if f" {path} " in line), "")
    assert action in row, result.stdout
    target = scenario.project / path
    if content == "conflict":
        text = target.read_text()
        assert "<<<<<<< yours\n# My own title\n=======\n" in text
        assert f">>>>>>> amptpl {amptpl.__version__}\n" in text
        assert text.split(">>>>>>>", 1)[1].split("\n", 1)[1] == scenario.today[path].decode().split("\n", 1)[1]
    else:
        want = expected(scenario, path, content)
        assert (target.read_bytes() if target.exists() else None) == want


def test_update_with_a_conflict_lists_it_last_and_exits_1(updated):
    _, result = updated
    assert result.exit_code == 1, result.output
    tail = result.stdout.strip().splitlines()[-2:]
    assert tail[0].startswith("Conflicts in 1 file: resolve the <<<<<<< ======= >>>>>>> markers")
    assert tail[1].strip() == "README.md"


def test_update_removes_the_folder_a_dropped_file_leaves_empty(updated):
    scenario, _ = updated
    assert not (scenario.project / "tools").exists()
    assert (scenario.project / "docs").is_dir()


def test_update_records_todays_render_as_the_new_base_and_keeps_the_answers(updated):
    scenario, _ = updated
    manifest = json.loads((scenario.project / ".amptpl.json").read_text())
    old = json.loads(scenario.before[".amptpl.json"])
    assert manifest["files"] == {path: sha256(data) for path, data in sorted(scenario.today.items())}
    assert manifest["template_version"] == amptpl.__version__
    assert (manifest["answers"], manifest["created"]) == (old["answers"], old["created"])
    assert base_files(scenario.project) == scenario.today
    assert sorted(p.name for p in (scenario.project / ".amptpl").iterdir()) == ["base.zip"]


def test_a_base_kept_as_a_folder_by_an_earlier_amptpl_is_merged_against_and_replaced_by_the_archive(
    updated, tmp_path
):
    scenario = make_scenario(tmp_path)
    state = scenario.project / ".amptpl"
    for rel, data in base_files(scenario.project).items():  # the layout amptpl kept before base.zip
        (state / "base" / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / "base" / rel).write_bytes(data)
    (state / "base.zip").unlink()
    manifest = json.loads((scenario.project / ".amptpl.json").read_text())
    (scenario.project / ".amptpl.json").write_text(json.dumps({**manifest, "base": ".amptpl/base"}, indent=2))

    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 1, result.output  # the README conflict, as with the archive
    reference, _ = updated
    for path, _, _ in CASES:
        mine, theirs = scenario.project / path, reference.project / path
        assert (mine.read_bytes() if mine.exists() else None) == (theirs.read_bytes() if theirs.exists() else None)
    assert sorted(p.name for p in state.iterdir()) == ["base.zip"]
    assert base_files(scenario.project) == scenario.today


def test_a_second_update_writes_nothing_and_exits_1_while_markers_are_left_then_0_once_resolved(tmp_path):
    scenario = make_scenario(tmp_path)
    cli.invoke(app, ["update", str(scenario.project)])
    after_first = snapshot(scenario.project)
    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 1, result.output
    assert snapshot(scenario.project) == after_first
    assert "keep yours" in result.stdout and "Conflicts in" not in result.stdout
    assert "warning: 1 file still holds the conflict markers of an earlier update: README.md;" in result.stdout

    readme = scenario.project / "README.md"
    edit(readme, lambda t: t.split("=======\n", 1)[0].replace("<<<<<<< yours\n", "") + t.split("\n>>>>>>> ", 1)[1].split("\n", 1)[1])
    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stdout and readme.read_text().startswith("# My own title\n")


def test_an_update_against_a_damaged_base_names_it_and_points_at_the_amptpl_new_files(tmp_path):
    scenario = make_scenario(tmp_path)
    (scenario.project / ".amptpl" / "base.zip").write_bytes(b"not a zip archive at all")
    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 1, result.output
    out = " ".join(result.stdout.split())  # rich may wrap the long lines
    assert f"warning: {scenario.project / '.amptpl' / 'base.zip'} cannot be read (BadZipFile: " in out
    assert "amptpl's version of each is in the .amptpl-new file named below" in out
    assert "resolve the <<<<<<< ======= >>>>>>> markers" not in out
    assert "merge amptpl's version from the .amptpl-new file named beside it" in out
    assert (scenario.project / f"src/{PKG}/train.py.amptpl-new").is_file()
    assert (scenario.project / f"src/{PKG}/train.py").read_bytes() == scenario.before[f"src/{PKG}/train.py"]


def test_an_update_that_cannot_write_is_one_line_exit_2_like_a_read_only_out_dir(tmp_path, monkeypatch):
    """A read-only project (a mount, a permission): one line naming the path, not a raw [Errno 30]."""
    import errno

    import amptpl.update as update_mod

    scenario = make_scenario(tmp_path)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(update_mod, "write_atomic", read_only)
    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith(f"Error: cannot update the project: {scenario.project}") and "Read-only file system" in line
    assert "[Errno" not in line


def test_dry_run_prints_the_plan_table_and_writes_nothing(tmp_path):
    scenario = make_scenario(tmp_path)
    result = cli.invoke(app, ["update", str(scenario.project), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert snapshot(scenario.project) == scenario.before
    assert "(dry run: nothing written)" in result.stdout
    assert "│ file" in result.stdout and "action" in result.stdout
    for path, action, _ in CASES:
        assert any(f" {path} " in line and action in line for line in result.stdout.splitlines()), path
    assert "1 file would conflict:" in result.stdout


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_a_dirty_git_work_tree_is_refused_and_force_updates_it(tmp_path):
    scenario = make_scenario(tmp_path, git=True)  # committed, then edited: the edits are uncommitted
    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "uncommitted changes" in line and "--force" in line
    assert snapshot(scenario.project) == scenario.before

    result = cli.invoke(app, ["update", str(scenario.project), "--force"])
    assert result.exit_code == 1, result.output
    assert (scenario.project / f"src/{PKG}/export.py").read_bytes() == scenario.today[f"src/{PKG}/export.py"]


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_a_clean_git_work_tree_is_updated_without_force(tmp_path):
    scenario = make_scenario(tmp_path, git=True)
    git_commit(scenario.project)
    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 1, result.output  # the README conflict, not a refusal
    assert (scenario.project / ADDED).read_bytes() == scenario.today[ADDED]


# ---------------------------------------------------------------------------------------------------- adopt


def strip_hashes(project: Path) -> None:
    """Make the project look rendered before `update` existed: no hashes, no base."""
    manifest = json.loads((project / ".amptpl.json").read_text())
    for key in ("files", "base"):
        manifest.pop(key)
    (project / ".amptpl.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(project / ".amptpl")


def test_a_project_without_hashes_gets_one_line_saying_how_to_adopt_it(tmp_path):
    render_project(NAME, tmp_path)
    project = tmp_path / NAME
    strip_hashes(project)
    before = snapshot(project)
    result = cli.invoke(app, ["update", str(project)])
    assert result.exit_code == 2
    assert f"amptpl update --adopt {project}" in one_error_line(result)
    assert snapshot(project) == before


def test_adopt_takes_the_current_files_as_the_base_and_backs_up_each_file_it_replaces(tmp_path):
    render_project(NAME, tmp_path)
    project = tmp_path / NAME
    strip_hashes(project)
    train = project / f"src/{PKG}/train.py"
    edit(train, lambda t: t + "# mine\n")
    mine = train.read_bytes()

    result = cli.invoke(app, ["update", str(project), "--adopt"])
    assert result.exit_code == 0, result.output
    backup = f"src/{PKG}/train.py.amptpl-backup"
    assert f"replace (backup at {backup})" in result.stdout
    assert (project / backup).read_bytes() == mine
    today = {rel.as_posix(): item.data for rel, item in plan_files(NAME, PKG).items()}
    assert train.read_bytes() == today[f"src/{PKG}/train.py"]
    assert base_files(project) == today

    result = cli.invoke(app, ["update", str(project)])
    assert (result.exit_code, result.stdout.strip()) == (0, f"{project} is up to date with amptpl {amptpl.__version__}")


# ---------------------------------------------------------------------------------------------------- bad input


def _write(rel: str, text: str):
    def setup(project: Path) -> None:
        (project / rel).write_text(text)

    return setup


def _manifest(**changes):
    def setup(project: Path) -> None:
        manifest = json.loads((project / ".amptpl.json").read_text())
        manifest.update(changes)
        (project / ".amptpl.json").write_text(json.dumps(manifest))

    return setup


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        (lambda p: shutil.rmtree(p), "does not exist"),
        (lambda p: (shutil.rmtree(p), p.write_text("a file")), "is a file, not a project directory"),
        (lambda p: (p / ".amptpl.json").unlink(), "not an amptpl project"),
        (_write(".amptpl.json", "{not json"), "cannot read"),
        (_write(".amptpl.json", "[1, 2]"), "expected a JSON object"),
        (_manifest(files={"../outside.py": "sha256:00"}), "not a relative path inside"),
        (_manifest(files={"a.py": 3}), 'must be a "sha256:..." hash'),
        (_manifest(files=["a.py"]), '"files" must map'),
        (_manifest(answers={"name": "../x"}), '"answers"."name"'),
        (_manifest(package="not-an-identifier"), '"package" must be a Python identifier'),
    ],
    ids=["missing folder", "a file", "no manifest", "bad json", "not an object", "path escapes", "bad hash",
         "files not a map", "bad name", "bad package"],  # fmt: skip
)
def test_update_refuses_bad_input_with_one_line_exit_2_and_writes_nothing(tmp_path, setup, says):
    render_project(NAME, tmp_path)
    project = tmp_path / NAME
    setup(project)
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["update", str(project)])
    assert result.exit_code == 2, result.output
    assert says in one_error_line(result)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- interrupted


def _nth_replace(n: int):
    return lambda name, src, dst, count: name == "replace" and count == n


INTERRUPTIONS = {
    "before the first file": _nth_replace(1),  # the journal is written, no project file yet
    "after two files": _nth_replace(3),
    "writing .amptpl.json": lambda name, src, dst, count: name == "replace" and Path(dst).name == ".amptpl.json",
    "swapping in the new base": lambda name, src, dst, count: name == "replace" and Path(dst).name == "base.zip",
}


@pytest.mark.parametrize("when", list(INTERRUPTIONS))
def test_an_interrupted_update_leaves_every_file_old_or_new_and_running_it_again_finishes(
    tmp_path, monkeypatch, when
):
    reference = make_scenario(tmp_path / "reference")
    cli.invoke(app, ["update", str(reference.project)])
    done = snapshot(reference.project)
    scenario = make_scenario(tmp_path / "interrupted")

    real = {"replace": os.replace, "rename": os.rename}
    counts = {"replace": 0, "rename": 0}

    def interrupting(name):
        def call(src, dst, *args, **kwargs):
            counts[name] += 1
            if INTERRUPTIONS[when](name, src, dst, counts[name]):
                raise KeyboardInterrupt
            return real[name](src, dst, *args, **kwargs)

        return call

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", interrupting("replace"))
        mp.setattr(os, "rename", interrupting("rename"))
        result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 130, result.output
    assert "interrupted" in one_error_line(result)

    now = snapshot(scenario.project)
    assert now[".amptpl.json"] == scenario.before[".amptpl.json"]
    assert not [p for p in now if "amptpl-tmp" in p]
    for path in set(scenario.before) | set(done):
        if path.startswith(".amptpl"):
            continue
        assert now.get(path) in (scenario.before.get(path), done.get(path)), path

    result = cli.invoke(app, ["update", str(scenario.project)])
    assert result.exit_code == 1, result.output
    assert "README.md" in result.stdout.strip().splitlines()[-1]
    finished = snapshot(scenario.project)
    assert {k: v for k, v in finished.items() if k != ".amptpl.json"} == {
        k: v for k, v in done.items() if k != ".amptpl.json"
    }
    assert json.loads(finished[".amptpl.json"])["files"] == json.loads(done[".amptpl.json"])["files"]


# ---------------------------------------------------------------------------------------------------- the project


@pytest.mark.slow
def test_the_updated_project_passes_its_own_quick_tests_and_does_not_collect_the_base(tmp_path):
    scenario = make_scenario(tmp_path)
    cli.invoke(app, ["update", str(scenario.project)])
    project = scenario.project
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **TERMINAL}
    env.pop("PYTHONPATH", None)

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, check=False)

    env["HF_HOME"] = str(tmp_path / "hf-home")
    # the merged project loads its config and trains in each precision (its whole suite is test_e2e.py's)
    proc = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py",
               "tests/test_train.py", "-k", "test_config or each_precision and fp16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # pytest does not collect the base's copy of the tests (it skips dot-folders)
    proc = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", ".")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert ".amptpl" not in proc.stdout and "tests/test_config.py" in proc.stdout


def test_the_projects_sdist_and_wheel_leave_out_the_base(tmp_path):
    pytest.importorskip("setuptools", reason="building the project needs setuptools")
    render_project(NAME, tmp_path)
    project = tmp_path / NAME
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    dist = tmp_path / "dist"
    build = (
        "import sys, pathlib; from setuptools import build_meta as b; d = sys.argv[1]; "
        "pathlib.Path(d, 'built.txt').write_text(b.build_sdist(d) + ' ' + b.build_wheel(d))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", build, str(dist)], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist, wheel = (dist / "built.txt").read_text().split()
    names = tarfile.open(dist / sdist).getnames() + zipfile.ZipFile(dist / wheel).namelist()
    assert any(n.endswith(f"{PKG}/train.py") for n in names)
    assert not [n for n in names if ".amptpl" in n]


def test_the_projects_lint_command_does_not_see_the_base(tmp_path):
    render_project(NAME, tmp_path)
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    project = tmp_path / NAME
    # a base folder as an earlier amptpl kept it (today's base is one zip file, with no .py for ruff to find)
    for folder in (project / ".amptpl/base" / f"src/{PKG}", project / f"src/{PKG}"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "unused_import.py").write_text("import os\n")  # F401, wherever ruff looks
    proc = subprocess.run(
        [ruff, "check", "--select", "F401", "--output-format", "concise", "src", "tests"],
        cwd=project, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert f"src/{PKG}/unused_import.py" in proc.stdout, proc.stdout + proc.stderr
    assert ".amptpl" not in proc.stdout


# ---------------------------------------------------------------------------------------------------- add upgrade
# (path in amp/, action, content afterwards) after: add with today's core, the user edits, a newer core.

ADD_CASES = [
    ("precision.py", "replace", "newer"),  # untouched by the user, changed in the newer core
    ("monitor.py", "merge", "merged"),  # the user appended, the newer core changed the first line
    ("console.py", "conflict", "conflict"),  # both changed the first line
    ("checkpoint.py", "keep yours", "user"),  # the user appended, the newer core left it alone
]


@dataclass
class AddScenario:
    dest: Path
    before: dict[str, bytes]  # amp/ after the user's edits
    newer: Path  # the newer core's amp/ folder


def make_add_scenario(root: Path, monkeypatch: pytest.MonkeyPatch) -> AddScenario:
    dest = root / "pkg"
    dest.mkdir(parents=True)
    add_core(dest)
    amp = dest / "amp"
    edit(amp / "monitor.py", lambda t: t + "# my monitor tweak\n")
    edit(amp / "console.py", first_line(lambda line: '"""My console."""'))
    edit(amp / "checkpoint.py", lambda t: t + "# my checkpoint tweak\n")
    newer = copy_template(root / "newer-template")
    core = newer / "src/project/amp"
    edit(core / "precision.py", lambda t: t + "# newer precision\n")
    edit(core / "monitor.py", first_line(lambda line: line + "  # newer"))
    edit(core / "console.py", first_line(lambda line: line + "  # newer"))
    monkeypatch.setenv(TEMPLATE_ENV, str(newer))
    return AddScenario(dest, snapshot(amp), core)


@pytest.mark.parametrize(("path", "action", "content"), ADD_CASES, ids=[c[1] for c in ADD_CASES])
def test_add_again_upgrades_the_core_like_update(tmp_path, monkeypatch, path, action, content):
    scenario = make_add_scenario(tmp_path, monkeypatch)
    result = cli.invoke(app, ["add", str(scenario.dest)])
    assert result.exit_code == 1, result.output  # console.py conflicts
    row = next((line for line in result.stdout.splitlines() if f" {path} " in line), "")
    assert action in row, result.stdout
    now = (scenario.dest / "amp" / path).read_bytes()
    newer = (scenario.newer / path).read_bytes()
    if content == "newer":
        assert now == newer
    elif content == "user":
        assert now == scenario.before[path]
    elif content == "merged":
        assert now == newer + b"# my monitor tweak\n"
    else:
        assert b'<<<<<<< yours\n"""My console."""\n=======\n' in now
        assert "console.py" in result.stdout.strip().splitlines()[-1]
    manifest = json.loads((scenario.dest / "amp" / ".amptpl.json").read_text())
    assert manifest["files"][path] == sha256(newer)
    assert base_files(scenario.dest / "amp")[path] == newer


def test_add_dry_run_of_an_upgrade_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch):
    scenario = make_add_scenario(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["add", str(scenario.dest), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before
    assert "(dry run: nothing written)" in result.stdout
    for path, action, _ in ADD_CASES:
        assert any(f" {path} " in line and action in line for line in result.stdout.splitlines()), path


def test_add_dry_run_of_a_first_copy_lists_the_files_and_writes_nothing(tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
    assert "Would copy the AMP core" in result.stdout and "nothing written" in result.stdout
    assert "  precision.py" in result.stdout.splitlines()


# ---------------------------------------------------------------------------------------------------- merge


MERGES = [
    # (base, yours, theirs, merged, conflicts)
    ("a\nb\nc\nd\ne\n", "a\nB\nc\nd\ne\n", "a\nb\nc\nD\ne\n", "a\nB\nc\nD\ne\n", 0),
    ("a\nb\nc\n", "a\nB\nc\n", "a\nb\nC\n", "a\n<<<<<<< yours\nB\nc\n=======\nb\nC\n>>>>>>> amptpl\n", 1),
    ("a\nb\nc\n", "a\nb\nc\nd\n", "z\na\nb\nc\n", "z\na\nb\nc\nd\n", 0),
    ("a\nb\nc\n", "a\nX\nc\n", "a\nX\nc\n", "a\nX\nc\n", 0),
    ("a\nb\nc\nd\n", "a\nc\nd\n", "a\nb\nc\n", "a\nc\n", 0),
    ("a\nb\nc\n", "a\nX\nc\n", "a\nY\nc\n", "a\n<<<<<<< yours\nX\n=======\nY\n>>>>>>> amptpl\nc\n", 1),
    ("a\nb", "a\nX", "a\nY", "a\n<<<<<<< yours\nX\n=======\nY\n>>>>>>> amptpl\n", 1),
]


@pytest.mark.parametrize("use_git", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_GIT, reason="no git"))])
@pytest.mark.parametrize(("base", "yours", "theirs", "merged", "conflicts"), MERGES)
def test_three_way_merge_takes_each_sides_changes_and_marks_clashes(base, yours, theirs, merged, conflicts, use_git):
    result = merge3(base.encode(), yours.encode(), theirs.encode(), use_git=use_git)
    assert (result.data.decode(), result.conflicts) == (merged, conflicts)


def test_the_pure_python_merge_is_used_when_git_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    result = merge3(b"a\nb\n", b"a\nX\n", b"a\nY\n")
    assert result.conflicts == 1 and b"<<<<<<< yours\nX\n=======\nY\n" in result.data


# ---------------------------------------------------------------------------------------------------- no torch


@pytest.mark.parametrize("command", ["update", "add"])
def test_update_and_add_do_not_import_torch_accelerate_or_datasets(tmp_path, command):
    render_project(NAME, tmp_path)
    target = tmp_path / NAME if command == "update" else tmp_path / NAME / "src" / PKG
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "amptpl", command, str(target), "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, **TERMINAL},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "amptpl.update" in imported
    heavy = [m for m in imported if m.split(".")[0] in {"torch", "accelerate", "datasets", "evaluate"}]
    assert heavy == []


def test_a_template_file_named_like_amptpls_bookkeeping_is_a_template_bug(tmp_path, monkeypatch):
    tpl = tmp_path / "tpl"
    (tpl / ".amptpl").mkdir(parents=True)
    (tpl / ".amptpl" / "x.txt").write_text("x\n")
    monkeypatch.setenv(TEMPLATE_ENV, str(tpl))
    result = cli.invoke(app, ["new", "demo", "--dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "amptpl's own bookkeeping" in one_error_line(result)
    assert not (tmp_path / "out").exists()



def test_update_renders_the_example_the_project_was_made_with(tmp_path):
    cli.invoke(app, ["new", NAME, "--dir", str(tmp_path), "--example", "segmentation"])
    project = tmp_path / NAME
    result = cli.invoke(app, ["update", str(project), "--dry-run"])
    assert (result.exit_code, result.stdout.strip()) == (0, f"{project} is up to date with amptpl {amptpl.__version__}")
    manifest = json.loads((project / ".amptpl.json").read_text())
    manifest["answers"]["example"] = "gan"
    (project / ".amptpl.json").write_text(json.dumps(manifest))
    result = cli.invoke(app, ["update", str(project)])
    assert result.exit_code == 2 and '"answers"."example" must be one of bytelm, segmentation' in result.output
