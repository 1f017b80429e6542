"""Never lose or mix a run, tried the way a user meets each case: through `amptpl new`, `amptpl run` and a generated
project. One row per case; each row's check says what must hold: nothing of the new run deleted, no two runs mixed,
the child saved after SIGTERM, no overwritten user file unlisted, no traceback, the exit codes. The cases a generated
project's own suite tries through its train command (a fresh start over another run, an out_dir another run holds,
a garbage RNG state in the resumed checkpoint: tests/test_run.py, tests/test_bad_input.py) are not tried twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _runs import Started, child_pids, gone, log_lines, world_size
from conftest import render

TINY = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "data.seq_len=32", "data.max_bytes=150000",
        "train.batch_size=8", "eval.batches=2", "amp.log_every=1", "amp.live=false", "train.warmup_steps=2"]


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


# ----------------------------------------------------------------------------
# the cases


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


CASES: list[tuple[str, Callable[[Path, dict, Path], None]]] = [
    ("amptpl new --force over edited train.py and README.md", new_force_over_edited_files),
    ("amptpl new safetensors / huggingface_hub", names_that_shadow_a_dependency),
    ("train.lr=inf, amp.scaler.growth_factor=.inf", non_finite_settings),
    ("a loss that goes non-finite in fp32", non_finite_loss_in_fp32_is_exit_3),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_no_run_is_lost_or_mixed(case, project, env, tmp_path):
    case(project, env, tmp_path)


# ----------------------------------------------------------------------------
# preemption: SIGTERM the ways schedulers send it, to a run whose data loader has workers, on 1 and 2 processes.
# "pid": to each training process (SLURM's scancel --signal, a `kill PID`); "group": to each one's process group
# with its data-loader workers (`kill -- -PGID`, a scheduler's preemption); "amptpl run": to amptpl, which
# forwards it. Each must save the step it was on and exit 0. SIGKILL to amptpl run: nothing can be forwarded,
# the training gets SIGTERM from the kernel (parent-death signal) and saves all the same.

# The workers matter where the signal reaches them too (a process group); each way on 2 processes, and on 1 where
# the chain of processes differs (amptpl run starts the training itself, not through accelerate launch).
# "pid" (scancel --signal to each rank) reaches the ranks as "group" does, which also reaches their workers
PREEMPTIONS = [(2, 2, "group"), (1, 0, "amptpl run"), (2, 2, "amptpl run"),
               (1, 2, "SIGKILL to amptpl run"), (2, 1, "SIGKILL to amptpl run")]


def trainers(run: Started, nproc: int) -> list[int]:
    """The training processes: amptpl run's child, or the ranks its `accelerate launch` child started."""
    kids = child_pids(run.proc.pid)
    return kids if nproc == 1 else [rank for kid in kids for rank in child_pids(kid)]


def start_training(project: Path, out: Path, nproc: int, workers: int, env: dict, cwd: Path) -> Started:
    cmd = [sys.executable, "-m", "amptpl", "run", str(project), *(["--num-processes", "2"] if nproc == 2 else []),
           *TINY, f"out_dir={out}", "train.max_steps=100000", "amp.checkpoint_every=0", f"data.num_workers={workers}"]
    run = Started(cmd, cwd, env)
    run.wait_until(lambda: len(log_lines(run.output)) >= 3, "three logged steps")
    return run


def last_step(output: str) -> int:
    return max(int(re.match(r"step (\d+)", line).group(1)) for line in log_lines(output))


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "workers", "target"), PREEMPTIONS,
                         ids=[f"{n}proc-{w}workers-{t.replace(' ', '-')}" for n, w, t in PREEMPTIONS])
def test_a_preempted_run_saves_the_step_it_was_on_and_exits_0(project, env, tmp_path, nproc, workers, target):
    out = tmp_path / "run"
    run = start_training(project, out, nproc, workers, env, tmp_path)
    try:
        ranks = trainers(run, nproc)
        assert len(ranks) == nproc, run.output
        assert all(len(child_pids(rank)) >= workers for rank in ranks), "the data loader's workers are not up"
        seen = last_step(run.output)
        for rank in ranks if target in ("pid", "group") else []:
            (os.kill if target == "pid" else os.killpg)(rank if target == "pid" else os.getpgid(rank), signal.SIGTERM)
        if target == "amptpl run":
            run.proc.send_signal(signal.SIGTERM)
        if target == "SIGKILL to amptpl run":
            run.proc.kill()
        code = run.finish(timeout=180)
        deadline = time.monotonic() + 120
        while not all(gone(rank) for rank in ranks):  # after a SIGKILL to amptpl, no one waits for them
            assert time.monotonic() < deadline, "the training outlived amptpl run"
            time.sleep(0.1)
    finally:
        if run.proc.poll() is None:
            run.kill_everything(nproc)
    output = run.output
    assert code == (-signal.SIGKILL if target.startswith("SIGKILL") else 0), output[-3000:]
    assert world_size(output) == nproc
    assert "Traceback" not in output and "is killed by signal" not in output, output[-3000:]
    if not target.startswith("SIGKILL"):
        assert "stopped by SIGTERM" in output
    (saved,) = ckpts(out)
    meta = json.loads((out / "checkpoints" / saved / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == nproc and meta["step"] >= seen
    assert not (out / ".lock").exists()


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
def test_sigkill_to_one_rank_of_two_is_one_line_from_the_other_naming_it_and_exit_1(project, env, tmp_path):
    run = start_training(project, tmp_path / "run", 2, 0, env, tmp_path)
    try:
        by_rank = {rank_of(pid): pid for pid in trainers(run, 2)}
        os.kill(by_rank[1], signal.SIGKILL)
        code = run.finish(timeout=180)
    finally:
        if run.proc.poll() is None:
            run.kill_everything(2)
    assert code == 1
    (line,) = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: rank 1 of 2 died or stopped answering (") and "so rank 0 stops too" in line
    assert "resumes from the last complete checkpoint" in line
    # torchrun then prints its own ChildFailedError report (exit codes per rank): docs/checkpoints.md says so
