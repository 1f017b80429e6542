"""Never lose or mix a run, tried the way a user meets each case: through `amptpl new`, `amptpl run` and a generated
project. One row per case; each row's check says what must hold: nothing of the new run deleted, no two runs mixed,
the child saved after SIGTERM, no overwritten user file unlisted, no traceback, the exit codes.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import render

TINY = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "data.seq_len=32", "data.max_bytes=150000",
        "train.batch_size=8", "eval.batches=2", "log.every=1", "log.live=false", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("proj"), "keeper")


def amptpl(*args: str, env: dict, cwd: Path | None = None, check_code: int | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "amptpl", *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    if check_code is not None:
        assert r.returncode == check_code, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def train(project: Path, out: Path, *args: str, env: dict, code: int = 0) -> subprocess.CompletedProcess:
    return amptpl("run", str(project), *TINY, f"out_dir={out}", *args, env=env, check_code=code)


def ckpts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------
# the cases


def fresh_start_over_another_run(project: Path, env: dict, tmp: Path) -> None:
    out = tmp / "run"
    train(project, out, "train.max_steps=20", "checkpoint.every=5", "checkpoint.keep=3", env=env)
    r = train(project, out, "resume=none", "train.max_steps=8", "checkpoint.every=4", "checkpoint.keep=3", env=env)
    assert ckpts(out) == ["step_0000004", "step_0000008"], "the new run's own checkpoints were deleted"
    assert (out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()).is_dir()
    (old,) = (out / "previous-runs").iterdir()
    assert ckpts(old) == ["step_0000010", "step_0000015", "step_0000020"] and f"moved to {old}" in r.stdout
    assert steps(out) == sorted(steps(out)) and max(steps(out)) == 8  # metrics.jsonl belongs to one run
    r = train(project, out, "train.max_steps=10", "checkpoint.every=4", env=env)
    assert "(step 8)" in r.stdout, "resume=auto continued the old run, not the new one"


def two_runs_in_one_out_dir(project: Path, env: dict, tmp: Path) -> None:
    out = tmp / "run"
    first = subprocess.Popen([sys.executable, "-m", "amptpl", "run", str(project), *TINY, f"out_dir={out}",
                              "train.max_steps=100000", "checkpoint.every=1"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):
                break
        second = train(project, out, "train.max_steps=3", "checkpoint.every=1", env=env, code=2)
        lock = json.loads((out / ".lock").read_text())
        (line,) = second.stderr.strip().splitlines()
        assert f"PID {lock['pid']}" in line and socket.gethostname() in line
    finally:
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=120)
    assert first.returncode == 0, rest[-2000:]
    logged = steps(out)
    assert logged == sorted(logged), "metrics.jsonl got rows from two runs"


def sigterm_to_amptpl_run(project: Path, env: dict, tmp: Path) -> None:
    out = tmp / "run"
    proc = subprocess.Popen([sys.executable, "-m", "amptpl", "run", str(project), *TINY, f"out_dir={out}",
                             "train.max_steps=100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest[-2000:]
    assert "stopped by SIGTERM" in rest
    (saved,) = ckpts(out)
    assert json.loads((out / "checkpoints" / saved / "meta.json").read_text())["complete"]
    assert not (out / ".lock").exists(), "the training child did not finish (its lock is still there)"


def new_force_over_edited_files(project: Path, env: dict, tmp: Path) -> None:
    mine = tmp / "mine"
    amptpl("new", "mine", "--dir", str(tmp), env=env, check_code=0)
    train_py = mine / "src" / "mine" / "train.py"
    train_py.write_text(train_py.read_text() + "\n# my change\n")
    (mine / "README.md").write_text("my notes\n")
    r = amptpl("new", "mine", "--dir", str(tmp), "--force", env=env, check_code=0)
    for path, content in ((train_py, "# my change"), (mine / "README.md", "my notes")):
        backups = list(path.parent.glob(path.name + ".amptpl-backup*"))
        assert backups and content in backups[0].read_text(), f"{path.name}: the user's version is lost"
        assert path.name in r.stdout and "backup" in r.stdout


def names_that_shadow_a_dependency(project: Path, env: dict, tmp: Path) -> None:
    for name in ("safetensors", "huggingface_hub", "huggingface-hub"):
        r = amptpl("new", name, "--dir", str(tmp), env=env, check_code=2)
        assert len(r.stderr.strip().splitlines()) == 1 and "shadow" in r.stderr
        assert not (tmp / name).exists()


def non_finite_settings(project: Path, env: dict, tmp: Path) -> None:
    for arg, key in (("train.lr=inf", "train.lr"), ("amp.scaler.growth_factor=.inf", "amp.scaler.growth_factor")):
        r = train(project, tmp / "run", arg, env=env, code=2)
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"error: {key}: must be a finite number")
    assert not (tmp / "run").exists()


def non_finite_loss_in_fp32_is_exit_3(project: Path, env: dict, tmp: Path) -> None:
    # a learning rate that blows the weights up: the loss goes non-finite and the run must not end "successfully"
    r = train(project, tmp / "run", "amp.precision=fp32", "train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0",
              "train.max_steps=40", "amp.guard.max_consecutive_skips=3", env=env, code=3)
    assert "AMP guard: the loss was non-finite" in r.stdout


def corrupt_rng_state_in_the_resumed_checkpoint(project: Path, env: dict, tmp: Path) -> None:
    out = tmp / "run"
    train(project, out, "train.max_steps=2", env=env)
    (out / "checkpoints" / "step_0000002" / "random_states_0.pkl").write_bytes(b"garbage")
    r = train(project, out, "train.max_steps=3", env=env)
    assert "random_states_0.pkl is unreadable" in r.stdout and "not bit-exact" in r.stdout


CASES: list[tuple[str, Callable[[Path, dict, Path], None]]] = [
    ("resume=none into an out_dir holding another run", fresh_start_over_another_run),
    ("two runs at once in one out_dir", two_runs_in_one_out_dir),
    ("SIGTERM to amptpl run", sigterm_to_amptpl_run),
    ("amptpl new --force over edited train.py and README.md", new_force_over_edited_files),
    ("amptpl new safetensors / huggingface_hub", names_that_shadow_a_dependency),
    ("train.lr=inf, amp.scaler.growth_factor=.inf", non_finite_settings),
    ("a loss that goes non-finite in fp32", non_finite_loss_in_fp32_is_exit_3),
    ("a corrupt random_states_0.pkl in the resumed checkpoint", corrupt_rng_state_in_the_resumed_checkpoint),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_no_run_is_lost_or_mixed(case, project, env, tmp_path):
    case(project, env, tmp_path)
