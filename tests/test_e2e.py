"""End to end: generate a project, install it, run its own test suite and lint, train it in every precision."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import render

TINY = [
    "model.d_model=32", "model.n_layer=1", "model.n_head=2", "data.seq_len=32", "data.max_bytes=150000",
    "train.batch_size=8", "eval.batches=2", "amp.log_every=1", "amp.live=false",
]


EXAMPLES = ["bytelm", "segmentation"]


@pytest.fixture(scope="module", params=EXAMPLES)
def project(request, tmp_path_factory) -> Path:
    """A project of each example: one suite (the project's own) proves the AMP core with both."""
    return render(tmp_path_factory.mktemp(f"gen-{request.param}"), "e2e-demo", "--example", request.param)


@pytest.fixture(scope="module")
def bytelm(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("gen"), "e2e-demo")


def test_generated_project_has_the_documented_layout_within_its_weight(project):
    amp = "src/e2e_demo/amp"
    for rel in ["pyproject.toml", "README.md", ".github/workflows/ci.yml", "configs/fp16_safe.yaml",
                *(f"{amp}/{m}.py" for m in ("settings", "session", "hooks", "precision", "master", "monitor",
                                            "checkpoint", "position", "rundir", "console", "distributed")),
                *(f"{amp}/debug/{m}.py" for m in ("audit", "meters", "loopcheck", "locate", "numerics", "autopick")),
                *(f"src/e2e_demo/{m}.py" for m in ("config", "configparse", "steps", "train", "bench", "locate",
                                                   "numerics", "export", "sample", "faults")),
                "tests/conftest.py", "tests/core/tiny_loop.py", "configs/demo.yaml",
                *(f"src/e2e_demo/example/{f}.py" for f in ("__init__", "config", "data", "model", "metrics", "sample"))]:
        assert (project / rel).is_file(), rel
    train_py = (project / "src/e2e_demo/train.py").read_text().splitlines()
    assert len(train_py) <= 300, f"train.py has grown to {len(train_py)} lines"
    source = sum(len(p.read_text().splitlines()) for p in (project / "src").rglob("*.py"))
    assert source <= 6000, f"the project's src/ holds {source} lines of Python"


def test_the_project_has_no_import_circle_and_its_loop_reads_no_part_of_the_session(project):
    """The project's modules (the AMP core has its own rule: it imports only itself, above) import each other in one
    direction: train, bench and locate share steps.py. A module importing names of its own package (``from . import
    X`` in example/data.py) is Python's package structure, not a circle. train.py asks the session (amp.step,
    amp.stop, amp.unwrap, ...) and never reaches into one of its parts (amp.monitor.switches, amp.progress)."""
    import ast

    pkg = project / "src" / "e2e_demo"
    modules = {}  # dotted name in the package -> (file, the package it is in)
    for path in pkg.rglob("*.py"):
        parts = path.relative_to(pkg).with_suffix("").parts
        package = parts[:-1]
        modules[".".join(package if parts[-1] == "__init__" else parts)] = (path, package)
    graph = {}
    for name, (path, package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # from .x import y, from .. import z
                target = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
                deps |= {t for t in (target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)) if t in modules}
        ancestors = {".".join(package[:i]) for i in range(len(package) + 1)}
        graph[name] = {d for d in deps - ancestors - {name} if not d.startswith("amp")}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ()))

    assert not [m for m in graph if not m.startswith("amp") and reaches(m, m)], "an import circle"
    assert not ({"bench", "locate"} & graph["train"]), graph["train"]
    reads = [f"amp.{n.value.attr}.{n.attr}" for n in ast.walk(ast.parse((pkg / "train.py").read_text()))
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
             and isinstance(n.value.value, ast.Name) and n.value.value.id == "amp"]
    assert reads == [], reads


def test_the_projects_readme_shows_its_quick_tier_first_with_its_time_then_the_full_suite(project):
    lines = [x for x in (project / "README.md").read_text().splitlines() if x.startswith("pytest ")]
    assert [x.split("#")[0].strip() for x in lines[:2]] == ['pytest -q -m "not slow"', "pytest -q"]
    assert re.search(r"quick tier.*: \d+ s on a 2-core", lines[0]) and re.search(r"full suite.*\d min", lines[1])
    markers = (project / "pyproject.toml").read_text()
    assert '"slow: ' in markers  # the marker the quick tier leaves out is declared


def test_generated_project_passes_ruff(project):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install ruff)")
    r = subprocess.run([ruff, "check", "src", "tests"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_amp_core_imports_only_stdlib_torch_accelerate_rich_and_itself(project):
    import ast

    allowed = {"torch", "accelerate", "rich", "__future__"} | set(sys.stdlib_module_names)
    for path in (project / "src/e2e_demo/amp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def _installs_and_shows_its_config(project: Path, env: dict, tmp_path: Path) -> None:
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(project)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # installed (not the source tree): the entry module runs from site-packages
    run_env = {**env, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "import e2e_demo, sys; print(e2e_demo.__file__)"], env=run_env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert str(site) in r.stdout
    # the config is discoverable from the installed project: --help lists every key, --print-config resolves
    r = subprocess.run([sys.executable, "-m", "e2e_demo.train", "--help"], env=run_env, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and "train.lr" in r.stdout and "amp.scaler.init_scale" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "e2e_demo.train", "--print-config", "train.lr=0.01"], env=run_env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["train"]["lr"] == 0.01, r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was run


@pytest.mark.slow
def test_generated_project_installs_and_its_own_test_suite_passes(project, env, tmp_path):
    default = json.loads((project / ".amptpl.json").read_text())["answers"]["example"] == EXAMPLES[0]
    if default:  # installing and the config's --help are the same for every example: tried once
        _installs_and_shows_its_config(project, env, tmp_path)
    # the default example's project runs every test: the AMP core's own (tests/core) and the project's; another
    # example's runs what depends on the example: its own tests, training and evaluating in each precision (a
    # BatchNorm model under autocast), the debugger's commands on its modules
    which = [] if default else [*map(str, (project / "tests").glob("test_example_*.py")), "tests/test_train.py",
                                "tests/test_commands.py", "-k", "example or each_precision or bf16_true or "
                                "eval_precision or locate_replays or numerics"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *which], cwd=project,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]


# The project's tests that touch TensorBoard, run as in the venv its README builds (`pip install -e ".[dev]"`,
# TensorBoard being the `tensorboard` extra): `import tensorboard` fails there and find_spec finds nothing.
WITHOUT_TENSORBOARD = """
import inspect, sys
sys.modules["tensorboard"] = None
import pytest

class TouchingTensorboard:
    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if "tensorboard" in inspect.getsource(i.function)]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rs", "tests"], plugins=[TouchingTensorboard()]))
"""


def test_the_projects_suite_passes_without_tensorboard_as_its_readme_installs_it(bytelm, env):
    dev = re.search(r"^dev = \[(.*)\]$", (bytelm / "pyproject.toml").read_text(), re.M)
    assert dev and "tensorboard" not in dev[1]  # the dev extra leaves it out: the case this test stands for
    r = subprocess.run([sys.executable, "-c", WITHOUT_TENSORBOARD], cwd=bytelm, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "failed" not in summary and "error" not in summary, r.stdout[-4000:]
    assert "SKIPPED" in r.stdout and "tensorboard" in r.stdout.split("SKIPPED", 1)[1]  # skipped for that reason


def test_amptpl_run_trains_the_project_in_fp16_and_saves_its_scaler(bytelm, env, tmp_path):
    """`amptpl run` is the project's train command in a child process: one precision through it (the project's
    suite trains in each, in-process)."""
    prec = "fp16"
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "amptpl", "run", str(bytelm), *TINY, "train.max_steps=3",
                        f"amp.precision={prec}", f"out_dir={out}"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"precision: requested {prec} -> {prec}" in r.stdout
    assert "step 3/3 | loss" in r.stdout
    assert (out / "checkpoints" / "step_0000003" / "meta.json").exists()
    assert (out / "checkpoints" / "step_0000003" / "scaler.pt").exists()


def test_amptpl_run_passes_a_bad_override_through_and_returns_its_exit_code(bytelm, env):
    r = subprocess.run([sys.executable, "-m", "amptpl", "run", str(bytelm), "amp.scaler.backoff_factor=2"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "amp.scaler.backoff_factor: must be in (0, 1)" in r.stderr
    assert "Traceback" not in r.stderr


def test_template_python_imports_as_is_from_the_installed_package(env, tmp_path):
    """The template is real Python: its core imports without rendering (only *.jinja files are rendered; the
    example joins it as src/PACKAGE/example/ when a project is rendered)."""
    from amptpl.resources import template_root

    src = Path(str(template_root())) / "src"
    r = subprocess.run([sys.executable, "-c", "import project.amp.session, project.configparse; print('ok')"],
                       env={**env, "PYTHONPATH": str(src)}, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
