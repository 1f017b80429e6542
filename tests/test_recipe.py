"""The integration recipe that `amptpl add` prints is the one that runs.

`amptpl add` prints unified diffs from plain example scripts (amptpl/recipes/) to the same scripts using the
copied AMP core. Here the printed Accelerate diff is applied with `patch` to the plain Accelerate script in a
throwaway package, and the result trains as a file, as a module and under `accelerate launch`, shows the loss
scale, keeps the scaler in its checkpoints, resumes bitwise-exactly after SIGKILL, saves on SIGTERM and stops a
collapsing loss scale. Everything runs on the CPU, offline.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _runs import Started, assert_same_weights, cpu_ranks, launch, log_lines, sealed, world_size
from typer.testing import CliRunner

from amptpl import recipe
from amptpl.cli import app
from amptpl.resources import CONFIGS_ENV, TEMPLATE_ENV, template_root

TERMINAL = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"}
try:  # click < 8.2 mixes stderr into stdout unless told not to; 8.2 removed the argument
    cli = CliRunner(env=TERMINAL, mix_stderr=False)
except TypeError:
    cli = CliRunner(env=TERMINAL)

PATCH = shutil.which("patch")
needs_patch = pytest.mark.skipif(PATCH is None, reason="needs the `patch` program")
# fp16 (a scaler to show, save and restore) on one process and two; bf16 on two (one process adds nothing to it)
CASES = [("fp16", 1), ("fp16", 2), ("bf16", 2)]
# the recipe killed and stopped on two ranks; on one process every loop shape is killed and stopped
# (test_foreign_loops.py), and what a bf16 checkpoint holds (no scaler.pt) the loss-scale test checks
KILLS = [("fp16", 2), ("bf16", 2)]
SIGTERMS = [("fp16", 2)]
# 512 rows, batch 16, 2 epochs: optimizer steps on 1 process and on 2 (each takes half of every batch list)
FINAL_STEP = {1: 64, 2: 32}
OUT = Path("runs", "example")  # the out_dir the recipe gives AmpSession, relative to the run's cwd


@pytest.fixture(autouse=True)
def _real_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test uses the installed template and recipes."""
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


def printed_diff(stdout: str, heading: str) -> str:
    """Exactly the diff printed under ``heading``: every line after it up to the first that is not a diff line."""
    lines = stdout.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    assert start is not None, f"{heading!r} is not in the output:\n{stdout}"
    diff = []
    for line in lines[start + 1:]:
        if not line.startswith((" ", "+", "-", "@")):
            break
        diff.append(line)
    return "".join(diff)


def apply(diff: str, target: Path) -> None:
    """``patch -p1 TARGET`` from TARGET's grandparent, with no fuzz: the diff applies exactly or the test fails."""
    p = subprocess.run([PATCH, "-p1", "--fuzz=0", "--no-backup-if-mismatch", str(target)], input=diff, text=True,
                       capture_output=True, cwd=target.parent.parent, check=False)
    assert p.returncode == 0, f"the printed diff does not apply to {target}:\n{p.stdout}{p.stderr}"


# ------------------------------------------------------------------------------------- the printed recipe


def test_add_prints_an_accelerate_diff_that_adds_at_most_12_lines(tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0, result.output
    diff = printed_diff(result.stdout, recipe.ACCELERATE.heading)
    added = recipe.added_lines(diff)
    assert 0 < len(added) <= 12, diff
    assert f"{recipe.ACCELERATE.heading} ({len(added)} lines added):" in result.stdout
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n@@ ")


def test_add_prints_both_recipes_and_where_each_line_is_explained(tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert printed_diff(result.stdout, recipe.ACCELERATE.heading) == recipe.diff(recipe.ACCELERATE)
    assert printed_diff(result.stdout, recipe.PYTORCH.heading) == recipe.diff(recipe.PYTORCH)
    assert recipe.STEP_BASED in result.stdout and recipe.POINTER in result.stdout


@pytest.mark.parametrize("page", ["README.md", "docs/copying-the-core.md"])
def test_the_readme_and_the_docs_show_the_accelerate_diff_exactly_as_add_prints_it(page):
    text = (Path(__file__).resolve().parents[1] / page).read_text(encoding="utf-8")
    m = re.search(r"^```diff\n(.*?)^```$", text, re.S | re.M)
    assert m, f"{page} has no ```diff block"
    assert m.group(1) == recipe.diff(recipe.ACCELERATE)


def test_the_docs_show_the_step_based_loop_exactly_as_add_prints_it():
    code = "\n".join(line[4:] for line in recipe.STEP_BASED.splitlines() if line.startswith("    "))
    page = Path(__file__).resolve().parents[1] / "docs" / "copying-the-core.md"
    assert f"```python\n{code}\n```" in page.read_text(encoding="utf-8")


def test_the_number_of_calls_the_docs_promise_is_the_number_the_recipe_makes():
    calls = set(re.findall(r"\bamp\.(\w+)\(", "\n".join(recipe.added_lines(recipe.diff(recipe.ACCELERATE)))))
    index = (Path(__file__).resolve().parents[1] / "docs" / "index.md").read_text(encoding="utf-8")
    words = {"five": 5, "six": 6, "seven": 7}
    said = re.search(r"contract with a loop is a constructor and (\w+) calls", index)
    assert said and words[said.group(1)] == len(calls), sorted(calls)


def test_every_line_the_accelerate_recipe_adds_is_quoted_in_the_amp_core_docstring():
    init = template_root() / "src" / "project" / "amp" / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert docstring, "amp/__init__.py has no module docstring"
    missing = [line for line in recipe.added_lines(recipe.diff(recipe.ACCELERATE))
               if line.strip() and line.strip() not in docstring]
    assert not missing, f"amp/__init__.py's docstring does not quote: {missing}"


@needs_patch
@pytest.mark.parametrize("which", [recipe.ACCELERATE, recipe.PYTORCH], ids=["accelerate", "pytorch"])
def test_the_printed_diff_turns_the_plain_example_into_the_amp_example_exactly(which, tmp_path):
    result = cli.invoke(app, ["add", str(tmp_path)])
    assert result.exit_code == 0, result.output
    target = tmp_path / "pkg" / "train.py"
    target.parent.mkdir()
    target.write_text(recipe.source(which.plain))
    apply(printed_diff(result.stdout, which.heading), target)
    assert target.read_text() == recipe.source(which.amp)


# --------------------------------------------------------------------------------------- running scripts


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Offline, unbuffered, no accelerate config of the user's, no inherited launcher or precision settings."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k != "PYTHONPATH"}
    e.update(HF_HOME=str(tmp_path_factory.mktemp("hf-home")), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200")
    return e


@pytest.mark.parametrize("which", [recipe.ACCELERATE, recipe.PYTORCH], ids=["accelerate", "pytorch"])
def test_the_plain_example_trains_unmodified_on_one_cpu_process(which, tmp_path, env):
    script = tmp_path / "train.py"
    script.write_text(recipe.source(which.plain))
    p = subprocess.run([sys.executable, str(script), "--cpu"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^epoch 1: \{'accuracy': [0-9.]+\}$", p.stdout, re.M), p.stdout


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A folder holding package ``mypkg``: the plain Accelerate example as ``mypkg/train.py``, then ``amptpl add
    mypkg`` run there and exactly the Accelerate diff it printed applied with ``patch -p1``."""
    if PATCH is None:
        pytest.skip("needs the `patch` program")
    root = tmp_path_factory.mktemp("repo")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "train.py").write_text(recipe.source(recipe.ACCELERATE.plain))
    # a narrow terminal: a diff line longer than the terminal must still print on one line
    terminal = {**os.environ, "COLUMNS": "60", "NO_COLOR": "1"}
    for key in (TEMPLATE_ENV, CONFIGS_ENV):
        terminal.pop(key, None)
    p = subprocess.run([sys.executable, "-m", "amptpl", "add", "mypkg"], cwd=root, env=terminal,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    apply(printed_diff(p.stdout, recipe.ACCELERATE.heading), root / "mypkg" / "train.py")
    return root


@pytest.mark.slow
@needs_patch
def test_the_recipe_runs_on_the_kernel_alone_that_add_minimal_copies(env, tmp_path):
    """``amptpl add --minimal``: amp/ without amp/debug/; the printed recipe trains fp16, checkpoints and resumes."""
    (tmp_path / "mypkg").mkdir()
    script = tmp_path / "mypkg" / "train.py"
    script.write_text(recipe.source(recipe.ACCELERATE.plain))
    result = cli.invoke(app, ["add", str(tmp_path / "mypkg"), "--minimal"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "mypkg" / "amp" / "debug").exists() and (tmp_path / "mypkg" / "amp" / "hooks.py").is_file()
    apply(printed_diff(result.stdout, recipe.ACCELERATE.heading), script)
    first = train(tmp_path, tmp_path, env, 1, "--mixed_precision", "fp16")
    assert first.returncode == 0 and log_lines(first.stdout), first.stdout + first.stderr
    assert "precision audit" not in first.stdout and (checkpoints(tmp_path) / latest(tmp_path) / "scaler.pt").is_file()
    again = train(tmp_path, tmp_path, env, 1, "--mixed_precision", "fp16")  # finished: the session trains nothing more
    assert again.returncode == 0 and "resume: loaded" in again.stdout, again.stdout + again.stderr


def docs_blocks(page: str, marker: str) -> list[str]:
    """The python blocks of ``docs/PAGE`` that contain ``marker``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text(encoding="utf-8")
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["OverflowLocator(", "numerics.suggest("], ids=["locate", "numerics"])
def test_the_debuggers_examples_run_as_written_in_the_recipes_script(marker, patched, env, tmp_path):
    """The debugger page's code for a copied core, pasted into the patched recipe script in place of its epoch loop
    (there ``amp`` is the session, not the package)."""
    (block,) = docs_blocks("debugger.md", marker)
    script = (patched / "mypkg" / "train.py").read_text()
    start, end = script.index("    # Now we train the model\n"), script.index("    amp.close()\n")
    body = "".join(f"    {line}\n" if line else "\n" for line in block.rstrip("\n").split("\n"))
    root = tmp_path / "repo"
    shutil.copytree(patched, root)
    (root / "mypkg" / "train.py").write_text(script[:start] + body + script[end:])
    p = train(root, tmp_path, env, 1, "--mixed_precision", "fp16")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    said = {"OverflowLocator(": "headroom in bits, log2(65504 / amax), lowest first:",
            "numerics.suggest(": "keep in float32: ["}
    assert said[marker] in p.stdout, p.stdout[-3000:]


def train_cmd(root: Path, nproc: int, *args: str, module: bool = False) -> list[str]:
    """The patched script as a file, as a module (``-m mypkg.train``) or under ``accelerate launch``."""
    if module:
        return [sys.executable, "-m", "mypkg.train", *args]
    return launch(root / "mypkg" / "train.py", nproc, *args)


def train_env(env: dict[str, str], root: Path, nproc: int, module: bool = False) -> dict[str, str]:
    e = cpu_ranks(env, nproc)
    if module:
        e["PYTHONPATH"] = str(root)
    return e


def train(root: Path, cwd: Path, env: dict[str, str], nproc: int, *args: str,
          module: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(root, nproc, *args, module=module), cwd=cwd,
                          env=train_env(env, root, nproc, module), capture_output=True, text=True, timeout=600,
                          check=False)


def start(root: Path, cwd: Path, env: dict[str, str], nproc: int, *args: str) -> Started:
    return Started(train_cmd(root, nproc, *args), cwd, train_env(env, root, nproc))


def checkpoints(cwd: Path) -> Path:
    return cwd / OUT / "checkpoints"


def latest(cwd: Path) -> str:
    return (checkpoints(cwd) / "latest").read_text().strip()


@dataclass
class Run:
    cwd: Path
    output: str


@pytest.fixture(scope="module")
def straight(patched, env, tmp_path_factory):
    """Uninterrupted runs of the patched script, one per (precision, processes), made once and shared."""
    runs: dict[tuple[str, int], Run] = {}

    def get(prec: str, nproc: int) -> Run:
        if (prec, nproc) not in runs:
            cwd = tmp_path_factory.mktemp(f"straight-{prec}-{nproc}")
            p = train(patched, cwd, env, nproc, "--mixed_precision", prec)
            assert p.returncode == 0, p.stdout + p.stderr
            runs[(prec, nproc)] = Run(cwd, p.stdout)
        return runs[(prec, nproc)]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("form", ["module"])  # as a file: every other test here runs it so
def test_the_patched_script_runs_as_a_file_and_as_a_module(form, patched, env, tmp_path):
    args = ["--mixed_precision", "fp16"] if form == "file" else []
    p = train(patched, tmp_path, env, 1, *args, module=form == "module")
    assert p.returncode == 0, p.stdout + p.stderr
    assert world_size(p.stdout) == 1, p.stdout
    assert latest(tmp_path) == f"step_{FINAL_STEP[1]:07d}"
    assert (tmp_path / OUT / "amp_summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_the_patched_script_runs_two_ranks_under_accelerate_launch(prec, straight):
    run = straight(prec, 2)
    assert world_size(run.output) == 2, run.output
    assert latest(run.cwd) == f"step_{FINAL_STEP[2]:07d}"


@pytest.mark.slow
@pytest.mark.parametrize(("prec", "nproc"), CASES)
def test_the_loss_scale_is_shown_and_fp16_checkpoints_hold_the_scaler(prec, nproc, straight):
    run = straight(prec, nproc)
    assert re.search(rf"^precision: requested {prec} -> {prec}\b", run.output, re.M), run.output
    ticks = log_lines(run.output)
    assert len(ticks) == FINAL_STEP[nproc] // 10, run.output
    saved = sorted(checkpoints(run.cwd).glob("step_*"))
    assert saved, f"no checkpoints in {checkpoints(run.cwd)}"
    if prec == "fp16":
        assert all(re.search(r"\| scale \d", line) for line in ticks), ticks
        assert all((ckpt / "scaler.pt").is_file() for ckpt in saved)
    else:  # bf16 needs no loss scaling: no scale to show and no scaler to save
        assert not any((ckpt / "scaler.pt").exists() for ckpt in saved)


@pytest.mark.slow
@pytest.mark.parametrize(("prec", "nproc"), CASES)
def test_the_users_script_gets_the_precision_audit_once_and_the_fp16_meters_at_each_log_tick(prec, nproc, straight):
    run = straight(prec, nproc)
    assert run.output.count("precision audit (") == 1, run.output  # after the first step, on the main process
    assert f"precision audit ({prec}): model weights float32" in run.output
    assert "warning: precision audit" not in run.output  # the recipe keeps float32 weights and optimizer state
    ticks = log_lines(run.output)
    metered = [bool(re.search(r"\| headroom -?[\d.]+ bits \| underflow [\d.]+%", line)) for line in ticks]
    assert metered == [prec == "fp16"] * len(ticks), ticks  # bf16 has no loss scale to meter


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks through /proc")
@pytest.mark.parametrize(("prec", "nproc"), KILLS)
def test_a_run_killed_after_its_first_checkpoint_resumes_to_bitwise_the_same_weights(
    prec, nproc, patched, env, straight, tmp_path
):
    ref = straight(prec, nproc)
    args = ("--mixed_precision", prec)
    run = start(patched, tmp_path, env, nproc, *args)
    run.wait_until((checkpoints(tmp_path) / "latest").exists, "the first checkpoint")
    ranks = run.kill_everything(nproc)
    if nproc > 1:
        assert len(ranks) == nproc, f"expected {nproc} ranks under the launcher, found {ranks}"
    killed_at = sealed(tmp_path / OUT)
    assert killed_at < f"step_{FINAL_STEP[nproc]:07d}" and not (tmp_path / OUT / "amp_summary.json").exists(), (
        "the kill came after the run had finished: nothing was tested")

    resumed = train(patched, tmp_path, env, nproc, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume: loaded {OUT / 'checkpoints' / killed_at}" in resumed.stdout, resumed.stdout
    assert world_size(resumed.stdout) == nproc
    final = f"step_{FINAL_STEP[nproc]:07d}"
    assert latest(tmp_path) == latest(ref.cwd) == final
    assert_same_weights(checkpoints(ref.cwd) / final, checkpoints(tmp_path) / final)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks through /proc")
@pytest.mark.parametrize(("prec", "nproc"), SIGTERMS)
def test_sigterm_mid_run_saves_a_complete_checkpoint_and_exits_0(prec, nproc, patched, env, tmp_path):
    """A preemption notice: SIGTERM to each training process. (Sent to `accelerate launch` alone, torchrun passes
    it on to the ranks, which save and exit 0, but torchrun itself then exits 1 with a SignalException.)"""
    run = start(patched, tmp_path, env, nproc, "--mixed_precision", prec)
    try:
        run.wait_until(lambda: log_lines(run.output), "the first log line")
        ranks = run.ranks(nproc)
        assert len(ranks) == nproc, ranks
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        code = run.finish()
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    assert code == 0, run.output
    m = re.search(r"stopped by SIGTERM at step (\d+); state saved to (\S+)", run.output)
    assert m, run.output
    step = int(m.group(1))
    assert 10 <= step < FINAL_STEP[nproc]
    saved = checkpoints(tmp_path) / f"step_{step:07d}"
    assert latest(tmp_path) == saved.name
    assert json.loads((saved / "meta.json").read_text())["complete"] is True
    assert (saved / "model.safetensors").is_file()
    assert (saved / "scaler.pt").is_file() == (prec == "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2])  # one process: test_real_scripts' guard restart, the project's guard tests
def test_the_guard_stops_a_run_started_at_a_loss_scale_of_1e38_with_exit_3(nproc, patched, env, tmp_path):
    """A user sets an absurd initial loss scale on the recipe's AmpSession line: every fp16 step overflows.
    Under accelerate launch every rank stops at the same tick with exit 3, and torchrun reports that as a failure."""
    root = tmp_path / "repo"
    shutil.copytree(patched, root)
    script = root / "mypkg" / "train.py"
    line = 'amp = AmpSession(args.mixed_precision, "runs/example", checkpoint_every=20, cpu=args.cpu)'
    assert line in script.read_text()
    script.write_text(script.read_text().replace(line, line[:-1] + ', scaler={"init_scale": 1e38})'))
    cwd = tmp_path / "run"
    cwd.mkdir()
    p = train(root, cwd, env, nproc, "--mixed_precision", "fp16")
    out = p.stdout + p.stderr
    if nproc == 1:
        assert p.returncode == 3, out
    else:
        assert p.returncode != 0 and "exitcode  : 3" in out, out  # torchrun's report of each rank's exit code
        assert re.search(r"^world_size=2 ", p.stdout, re.M), out
    assert sum("AMP guard: " in line for line in p.stdout.splitlines()) == 1, out  # one diagnosis, main process
    assert (checkpoints(cwd) / latest(cwd) / "model.safetensors").is_file()


@pytest.mark.slow
@needs_patch
def test_the_printed_pytorch_diff_makes_a_plain_pytorch_loop_train_in_fp16_with_the_scale_shown(env, tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    script = tmp_path / "mypkg" / "train.py"
    script.write_text(recipe.source(recipe.PYTORCH.plain))
    result = cli.invoke(app, ["add", str(tmp_path / "mypkg")])
    assert result.exit_code == 0, result.output
    apply(printed_diff(result.stdout, recipe.PYTORCH.heading), script)
    # the PyTorch recipe asks for "auto", which follows `accelerate launch --mixed_precision fp16`
    p = train(tmp_path, tmp_path, {**env, "ACCELERATE_MIXED_PRECISION": "fp16"}, 1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^precision: requested auto -> fp16\b", p.stdout, re.M), p.stdout
    ticks = log_lines(p.stdout)
    assert ticks and all(re.search(r"\| scale \d", line) for line in ticks), p.stdout
    assert re.search(r"^epoch 1: \{'accuracy': [0-9.]+\}$", p.stdout, re.M), p.stdout
    final = checkpoints(tmp_path) / latest(tmp_path)
    assert final.name == f"step_{FINAL_STEP[1]:07d}" and (final / "scaler.pt").is_file()
