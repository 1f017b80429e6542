"""``amptpl run`` passes SIGTERM and SIGINT on to the whole training run and exits with the run's code.

The training is a fake project (a manifest and ``src/fakeproj/train.py``) that behaves like a real one: on
the first stop signal it finishes a short "save" loop, writes ``saved`` and exits; it has started a
grandchild process (a data-loader worker, say), which must get the signal too. The tests start
``python -m amptpl run`` as a user would, signal amptpl only, and look at what is left in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amptpl.runner import run_project

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

TERMINAL = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"}

# {on_signal}: what the training does when its first stop signal arrives, as Python statements.
TRAIN = """
import os, signal, subprocess, sys, time
from pathlib import Path

here = Path(os.environ["FAKE_RUN_DIR"])
asked = []
{handlers}
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
(here / "worker.pid").write_text(str(worker.pid))
(here / "running").write_text(str(os.getpid()))
for _ in range(1200):  # a minute of "training" at most
    if asked:
        break
    time.sleep(0.05)
else:
    sys.exit(99)  # never asked to stop
{on_signal}
"""

SAVE_AND_EXIT = """
for _ in range(5):  # the save takes a moment; amptpl must wait for it
    time.sleep(0.05)
try:
    worker.wait(timeout=10)  # the worker got the same signal (it is in the group) and is gone
except subprocess.TimeoutExpired:
    pass
(here / "saved").write_text(signal.Signals(asked[0]).name)
sys.exit({code})
"""

HANDLE_TERM_AND_INT = """
signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))
signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
"""


def make_project(root: Path, train_code: str) -> Path:
    """A minimal amptpl project: a manifest and src/fakeproj/train.py (as in test_cli.make_fake_project)."""
    project = root / "proj"
    (project / "src" / "fakeproj").mkdir(parents=True)
    (project / "src" / "fakeproj" / "__init__.py").write_text("")
    (project / "src" / "fakeproj" / "train.py").write_text(train_code)
    (project / ".amptpl.json").write_text('{"package": "fakeproj"}')
    return project


def start_amptpl(project: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, **TERMINAL, "FAKE_RUN_DIR": str(run_dir)}
    with open(run_dir / "amptpl.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "amptpl", "run", str(project)], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            pytest.fail(f"amptpl exited {proc.returncode} before {path.name} appeared")
        time.sleep(0.05)
    pytest.fail(f"{path.name} did not appear in {timeout} s")


def stat(pid: int) -> tuple[str, int]:
    """(state, process group) from /proc/PID/stat: "pid (comm) state ppid pgrp ...", comm may hold spaces."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def process_group(pid: int) -> int:
    return stat(pid)[1]


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` still running. A zombie (state Z) is dead and not counted: a worker whose
    parent died first waits there for init to collect it, which some container inits never do."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, group = stat(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
            if group == pgid and state != "Z":
                members.append(int(entry.name))
    return members


def clean_up(proc: subprocess.Popen, run_dir: Path) -> None:
    """Kill whatever a failed test left: amptpl, the training and its worker (never this test's own group)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for name in ("running", "worker.pid"):
        path = run_dir / name
        if path.exists() and path.read_text():
            pid = int(path.read_text())
            try:
                if process_group(pid) not in (os.getpgrp(), 0):
                    os.killpg(process_group(pid), signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass  # already gone


@pytest.mark.parametrize(
    ("sent", "handlers", "on_signal", "expected_code", "saved"),
    [
        pytest.param(signal.SIGTERM, HANDLE_TERM_AND_INT, SAVE_AND_EXIT.format(code=0), 0, "SIGTERM", id="sigterm-saves"),
        pytest.param(signal.SIGINT, HANDLE_TERM_AND_INT, SAVE_AND_EXIT.format(code=0), 0, "SIGINT", id="sigint-saves"),
        pytest.param(signal.SIGTERM, HANDLE_TERM_AND_INT, SAVE_AND_EXIT.format(code=7), 7, "SIGTERM", id="exit-7"),
        pytest.param(signal.SIGTERM, "", "", 128 + signal.SIGTERM, None, id="no-handler-dies-143"),
    ],
)
def test_a_stop_signal_to_amptpl_run_reaches_the_whole_run_and_amptpl_exits_with_the_runs_code(
    tmp_path, sent, handlers, on_signal, expected_code, saved
):
    """The training saves and exits, its worker gets the signal too, and nothing of the run is left."""
    project = make_project(tmp_path, TRAIN.format(handlers=handlers, on_signal=on_signal))
    proc = start_amptpl(project, tmp_path)
    try:
        train_pid = int(wait_for(tmp_path / "running", proc))
        worker_pid = int(wait_for(tmp_path / "worker.pid", proc))
        pgid = process_group(train_pid)
        assert pgid == train_pid, "the training should lead its own process group"
        assert pgid != os.getpgid(proc.pid), "the training should not share amptpl's process group"
        assert process_group(worker_pid) == pgid

        proc.send_signal(sent)
        code = proc.wait(timeout=60)

        log = (tmp_path / "amptpl.log").read_text()
        assert code == expected_code, log
        if saved:
            assert (tmp_path / "saved").read_text() == saved
        assert live_members(pgid) == [], f"left behind in group {pgid}: {live_members(pgid)}"
        assert f"{signal.Signals(sent).name} sent to the run" in log
    finally:
        clean_up(proc, tmp_path)


SECOND_CTRL_C = """
signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
"""

SLOW_SAVE_STOPPED_BY_A_SECOND_CTRL_C = """
(here / "saving").write_text("1")
for _ in range(1200):  # a slow save (a minute at most) that a second Ctrl-C cuts short
    if len(asked) > 1:
        worker.wait(timeout=10)
        sys.exit(130)
    time.sleep(0.05)
sys.exit(98)  # the second Ctrl-C never came
"""


def test_a_second_ctrl_c_is_forwarded_too(tmp_path):
    """The training decides what a second Ctrl-C means (here: stop the slow save); amptpl passes it on."""
    project = make_project(
        tmp_path, TRAIN.format(handlers=SECOND_CTRL_C, on_signal=SLOW_SAVE_STOPPED_BY_A_SECOND_CTRL_C)
    )
    proc = start_amptpl(project, tmp_path)
    try:
        pgid = int(wait_for(tmp_path / "running", proc))
        assert process_group(pgid) == pgid, "the training should lead its own process group"
        proc.send_signal(signal.SIGINT)
        wait_for(tmp_path / "saving", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, (tmp_path / "amptpl.log").read_text()
        assert live_members(pgid) == []
    finally:
        clean_up(proc, tmp_path)


def test_run_project_restores_the_signal_handlers_it_replaced(tmp_path):
    project = make_project(tmp_path, "import sys\nsys.exit(5)\n")

    def mine(signum: int, frame: object) -> None:  # pragma: no cover - never called
        pass

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    previous_term = signal.signal(signal.SIGTERM, mine)
    try:
        assert run_project(project) == 5
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        assert signal.getsignal(signal.SIGHUP) is before[signal.SIGHUP]
    finally:
        signal.signal(signal.SIGTERM, previous_term)
