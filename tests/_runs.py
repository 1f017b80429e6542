"""Running training scripts as their users do (a file, ``accelerate launch``), killing them, and reading what they
printed: shared by the tests of the printed recipe and of loops the AMP core did not write."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path | str, nproc: int, *args: str) -> list[str]:
    """``python SCRIPT ARGS`` for one process, ``accelerate launch --multi_gpu --num_processes N`` for several."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--main_process_port", str(free_port()), str(script), *args]


def cpu_ranks(env: dict[str, str], nproc: int) -> dict[str, str]:
    """The environment for ``nproc`` processes: CPU ranks (gloo) when there are several, also beside a GPU."""
    return {**env, "ACCELERATE_USE_CPU": "1"} if nproc > 1 else dict(env)


class Started:
    """A command in the background, in a session of its own; its output is collected by a thread as it comes."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.output}"
            time.sleep(0.01)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=60)
        return code

    def ranks(self, nproc: int) -> list[int]:
        """The training processes: the script itself, or the ranks ``accelerate launch`` started."""
        return child_pids(self.proc.pid) if nproc > 1 else [self.proc.pid]

    def kill_everything(self, nproc: int) -> list[int]:
        """SIGKILL to the launcher and every rank at once (a lost node, the OOM killer); returns the ranks' PIDs.
        torchrun starts each rank in a session of its own, so the launcher's process group alone is not enough."""
        ranks = child_pids(self.proc.pid) if nproc > 1 else []
        try:
            for group in [self.proc.pid, *ranks]:
                os.killpg(group, signal.SIGKILL)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        assert self.finish() == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in ranks):
            assert time.monotonic() < deadline, "a rank outlived SIGKILL"
            time.sleep(0.05)
        return ranks


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def log_lines(output: str) -> list[str]:
    """The plain log-tick lines (``step 10/... | loss ... | ...``) the session prints off a terminal."""
    return [line for line in output.splitlines() if re.match(r"step \d+", line) and " | loss " in line]


def world_size(output: str) -> int | None:
    m = re.search(r"^world_size=(\d+) ", output, re.M)
    return int(m.group(1)) if m else None


def latest(out_dir: Path) -> str:
    return (out_dir / "checkpoints" / "latest").read_text().strip()


def sealed(out_dir: Path) -> str:
    """The newest sealed checkpoint: what resume=auto loads after a kill. ``latest`` lags it by one save when the
    kill falls between a checkpoint's rename and the update of ``latest``."""
    return max(p.name for p in (out_dir / "checkpoints").glob("step_*") if p.is_dir())


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold bitwise the same model weights."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"
