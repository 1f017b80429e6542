"""Run a generated project's training: ``amptpl run [PROJECT] [--launch-config FILE | --num-processes N]``.

Direct runs are ``python -m <package>.train key=value ...`` with ``PROJECT/src`` on ``PYTHONPATH``, so a
project runs without being installed. Distributed runs go through ``accelerate launch`` (run as
``python -m accelerate.commands.launch`` so the interpreter is the one chosen here). That Python is the
project's own environment, ``PROJECT/.venv``, when it has one, else the one amptpl runs under
(``project_python``). Before anything starts, a child of it must import torch and accelerate
(``check_training_stack``): amptpl alone does not install them, and a missing one is one line saying what to
install, not a traceback from the run. amptpl adds nothing
to the distributed engine: it only assembles the command line, and passes SIGTERM/SIGINT/SIGHUP on to the
run's whole process group (``run_forwarding_signals``), so a stopped ``amptpl run`` never leaves it behind.

This module never imports torch: whether a GPU is present is asked of a child process.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import AmptplError
from .launchconfig import LOAD_CHECK, config_problem, default_config_file, predict_launch, read_accelerate_config
from .manifest import MANIFEST


def cuda_device_count(python: str | None = None) -> int:
    """Number of CUDA GPUs, asked of a child ``python`` (default: this one) so this process never imports torch
    (0 on any failure)."""
    try:
        proc = subprocess.run(
            [python or sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0


def read_package(project_dir: Path) -> str:
    """The project's import package, from ``PROJECT/.amptpl.json``."""
    manifest = project_dir / MANIFEST
    if not manifest.is_file():
        raise AmptplError(f"not an amptpl project: {manifest} not found")
    try:
        package = json.loads(manifest.read_text(encoding="utf-8"))["package"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AmptplError(
            f'{manifest} is not a valid amptpl manifest (needs a "package" key): {exc}'
        ) from exc
    if not isinstance(package, str) or not package.isidentifier():
        raise AmptplError(f'{manifest}: "package" must be a Python identifier, got {package!r}')
    return package


def project_python(project_dir: Path) -> str:
    """The Python that runs the project: ``PROJECT/.venv``'s when the project has one, else amptpl's own.

    A project set up with ``python -m venv .venv && .venv/bin/pip install -e .`` then trains in its own
    environment even when amptpl was installed apart from it, without torch (``pipx install .`` from its checkout). The
    path is kept as found, not resolved: a venv's ``bin/python`` is a symlink whose target is another Python.
    """
    for rel in ("bin/python", "Scripts/python.exe"):  # POSIX, Windows
        candidate = project_dir / ".venv" / rel
        if candidate.is_file():
            return str(candidate)
    return sys.executable


# Run by the project's Python: exit 1 with "module: Error: message" for the first of them that does not import;
# then, given an accelerate config path, exit 3 with "config: Error: message" when accelerate cannot load it.
_STACK_CHECK = LOAD_CHECK + """
import importlib, sys
for name in ("torch", "accelerate"):
    try:
        importlib.import_module(name)
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{name}: {type(exc).__name__}: {first}")
        sys.exit(1)
problem = config_load_error(sys.argv[1]) if len(sys.argv) > 1 else None
if problem:
    print("config: " + problem)
    sys.exit(3)
"""


def check_training_stack(python: str, env: dict[str, str], cwd: Path, launch_config: str | None = None) -> None:
    """Raise ``AmptplError`` (one line: which Python, what failed, what to install) unless a child ``python``
    with ``env`` imports torch and accelerate, and accelerate loads ``launch_config`` (when given). The run
    imports them next, so they are then in the page cache."""
    try:
        proc = subprocess.run(
            [python, "-c", _STACK_CHECK, *([launch_config] if launch_config else [])],
            env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    except OSError as exc:
        raise AmptplError(f"cannot start the project's Python {python}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise AmptplError(f"{python} took over 10 minutes to import torch and accelerate; nothing started") from exc
    if proc.returncode == 0:
        return
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    detail = lines[-1] if lines else f"exit code {proc.returncode}"
    if proc.returncode == 3 and detail.startswith("config: "):
        raise AmptplError(f"{launch_config}: accelerate launch cannot use it ({detail.removeprefix('config: ')})")
    problem = "is not installed for" if "ModuleNotFoundError" in detail else "does not import with"
    venv = f", or make {cwd / '.venv'} with it: amptpl run uses that Python" if python == sys.executable else ""
    raise AmptplError(
        f"the project's training stack {problem} {python} ({detail}): run `{python} -m pip install -e {cwd}` "
        f'(or pip install ".[train]" in amptpl\'s checkout){venv}'
    )


def launch_config_used(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The accelerate config file ``argv`` makes ``accelerate launch`` read: its ``--config_file``, else the
    default config when one exists; None for a direct run, which reads none."""
    if "accelerate.commands.launch" not in argv:
        return None
    if "--config_file" in argv:
        return argv[argv.index("--config_file") + 1]
    default = default_config_file(env)
    return default if os.path.isfile(default) else None


def check_launch_config(path: str, explicit: bool) -> str | None:
    """Raise ``AmptplError`` (one line naming ``path`` and the value) when ``accelerate launch`` cannot read
    or use the config at ``path``; return the one-process-trap warning for a config given explicitly."""
    config, error = read_accelerate_config(path)
    if config is not None and not error:
        error = config_problem(config)
    if error:
        raise AmptplError(f"{path}: accelerate launch cannot use it ({error})")
    return predict_launch(config, 0)[1] if explicit else None


def _find_launch_config(launch_config: str | os.PathLike[str], project_dir: Path) -> Path:
    path = Path(launch_config).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, project_dir / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    where = "" if path.is_absolute() else f" (looked in {Path.cwd()} and {project_dir})"
    raise AmptplError(f"launch config not found: {launch_config}{where}")


def build_run_command(
    project_dir: str | os.PathLike[str] = ".",
    launch_config: str | os.PathLike[str] | None = None,
    num_processes: int | None = None,
    overrides: Sequence[str] = (),
    bench: bool = False,
) -> tuple[list[str], dict[str, str], Path]:
    """Return ``(argv, env, cwd)`` that run the project's training with ``overrides`` (``key=value`` strings).

    - neither option: ``python -m PACKAGE.train ...``;
    - ``bench``: ``python -m PACKAGE.bench ...`` (one process; ``overrides`` may hold its options, e.g. ``--steps 5``,
      which the bench checks itself);
    - ``launch_config``: ``accelerate launch --config_file FILE -m PACKAGE.train ...`` (FILE is looked up
      relative to the current directory first, then the project);
    - ``num_processes``: ``accelerate launch --num_processes N ...``, ``--multi_gpu`` when N > 1, and
      ``ACCELERATE_USE_CPU=1`` when there is no CUDA GPU.
    """
    project = Path(project_dir).expanduser().resolve()
    if not project.is_dir():
        what = "is a file, not a project directory" if project.exists() else "does not exist"
        raise AmptplError(f"project directory {project_dir} {what}")
    package = read_package(project)
    for override in () if bench else overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise AmptplError(f"{override!r} is not a key=value override (e.g. train.max_steps=200)")
    if bench and (launch_config is not None or num_processes is not None):
        raise AmptplError("--bench runs one process; drop --launch-config and --num-processes")
    if launch_config is not None and num_processes is not None:
        raise AmptplError("--launch-config and --num-processes cannot be used together; pick one")
    if num_processes is not None and num_processes < 1:
        raise AmptplError(f"--num-processes must be at least 1, got {num_processes}")

    python = project_python(project)
    env = dict(os.environ)
    src = str(project / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    module = ["-m", f"{package}.{'bench' if bench else 'train'}", *overrides]
    launch = [python, "-m", "accelerate.commands.launch"]

    if launch_config is not None:
        config = _find_launch_config(launch_config, project)
        argv = [*launch, "--config_file", str(config), *module]
    elif num_processes is not None:
        argv = [
            *launch,
            "--num_processes", str(num_processes),
            "--num_machines", "1",
            "--mixed_precision", "no",  # the project picks its precision itself and says why
            "--dynamo_backend", "no",
        ]  # fmt: skip
        if num_processes > 1:
            argv.append("--multi_gpu")
        if (cuda_device_count() if python == sys.executable else cuda_device_count(python)) == 0:
            # `accelerate launch --cpu --num_processes 2` silently starts ONE process; `--multi_gpu` with
            # ACCELERATE_USE_CPU=1 starts N real ranks on the gloo backend.
            env["ACCELERATE_USE_CPU"] = "1"
        argv += module
    else:
        argv = [python, *module]
    return argv, env, project


def format_command(argv: Sequence[str], env: dict[str, str]) -> str:
    """One shell line: the variables that differ from this process's environment, then the quoted argv."""
    assigned = []
    for key, value in env.items():
        old = os.environ.get(key)
        if old == value:
            continue
        if key == "PYTHONPATH" and old and value.endswith(old):  # show what was prepended, not the old path
            assigned.append(f"{key}={shlex.quote(value[: -len(old)])}$PYTHONPATH")
        else:
            assigned.append(f"{key}={shlex.quote(value)}")
    return " ".join([*assigned, shlex.join(argv)])


def run_project(
    project_dir: str | os.PathLike[str] = ".",
    launch_config: str | os.PathLike[str] | None = None,
    num_processes: int | None = None,
    overrides: Sequence[str] = (),
    echo: Callable[[str], None] | None = None,
    bench: bool = False,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Build the command (see ``build_run_command``), check that its Python imports torch and accelerate
    (``check_training_stack``: ``AmptplError`` and nothing started if not), show it through ``echo``, run it;
    return its exit code.

    ``echo`` gets the command as one shell line, with the environment variables amptpl sets in front; ``warn``
    the one-process-trap warning for a ``launch_config`` that starts one process where it asks for several.
    An accelerate config that ``accelerate launch`` would stop on is ``AmptplError`` (``check_launch_config``).
    SIGTERM, SIGINT and SIGHUP sent to amptpl go to the whole run (see ``run_forwarding_signals``), so a
    scheduler's SIGTERM or a Ctrl-C lets the training save and exit; amptpl then returns its exit code.
    """
    argv, env, cwd = build_run_command(project_dir, launch_config, num_processes, overrides, bench=bench)
    config = launch_config_used(argv, env)
    trap = check_launch_config(config, explicit=launch_config is not None) if config else None
    check_training_stack(argv[0], env, cwd, config)  # argv[0]: the project's Python, direct or under the launcher
    if echo is not None:
        echo(format_command(argv, env))
    if trap and warn is not None:
        warn(trap)
    return run_forwarding_signals(argv, env, cwd)


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if os.name == "posix" else ()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as a shell says


def _rank_groups(launcher: int) -> list[int]:
    """Process groups of ``launcher``'s children that lead a group of their own (torchrun's ranks), via /proc."""
    groups = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            ppid, pgid = int(fields[1]), int(fields[2])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and pgid != launcher:
            groups.append(pgid)
    return sorted(set(groups))


def _own_group_ending_with(parent: int) -> dict:
    """``Popen`` arguments that start the child leading a process group of its own (in this session, on this
    terminal) and, on Linux, have it sent SIGTERM when amptpl dies (``prctl(PR_SET_PDEATHSIG)``): a SIGKILLed
    ``amptpl run`` does not leave an orphaned training behind holding the run's lock; it saves and exits.
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec may not
        except OSError:
            libc = None
    if libc is None:  # process_group=0 (3.11+) is setpgid(0, 0) in the child; preexec_fn before 3.11
        return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}

    def in_child() -> None:
        os.setpgid(0, 0)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG; kept across exec
        if os.getppid() != parent:  # amptpl died before the prctl: the signal would never come
            os.kill(os.getpid(), signal.SIGTERM)

    return {"preexec_fn": in_child}


def run_forwarding_signals(argv: Sequence[str], env: dict[str, str], cwd: str | os.PathLike[str]) -> int:
    """Run ``argv`` in its own process group, forward stop signals to that group, return its exit code.

    A plain child would be left behind by a SIGTERM to amptpl (it dies with 143 and the training runs on,
    orphaned, never saving), and a terminal's Ctrl-C would reach it and every process it started at once.
    Here the child leads a new process group, so only amptpl gets the terminal's signals; SIGTERM, SIGINT and
    SIGHUP are passed on with ``os.killpg`` to the whole group (the training and its data-loader workers;
    under ``accelerate launch``, to each rank's own group instead, so the launcher sees them save and exit 0),
    every time they arrive: a second Ctrl-C is forwarded too, and the training's own handler
    decides what it means. amptpl waits for the child to exit and restores its handlers afterwards. A signal
    that amptpl was told to ignore (``nohup``: SIGHUP) is left ignored, as the child inherits it. The run
    still writes to the terminal, but it is not the terminal's foreground group, so it cannot read from it:
    to stop at a ``breakpoint()``, run ``python -m PACKAGE.train`` directly.

    amptpl killed outright (SIGKILL, out of memory) cannot forward anything: on Linux the child gets SIGTERM
    then (see ``_own_group_ending_with``), as if it had been forwarded; under ``accelerate launch`` the launcher
    passes it on to the ranks.

    Returns the child's exit code, ``128 + N`` when it died of signal N.
    """
    if not FORWARDED_SIGNALS or threading.current_thread() is not threading.main_thread():
        # no process groups, or not allowed to set signal handlers (only the main thread may): run it plainly
        return _exit_code(subprocess.run(list(argv), check=False, env=env, cwd=cwd).returncode)

    launched = "accelerate.commands.launch" in argv
    child: list[subprocess.Popen] = []  # set once started; a signal before that is held in `pending`
    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if not child:
            pending.append(signum)
            return
        name = signal.Signals(signum).name
        # os.write, not print: a handler may interrupt a print in progress
        os.write(2, f"amptpl run: {name} sent to the run; waiting for it to exit\n".encode())
        # under `accelerate launch` the ranks run in sessions of their own: signal them, not the launcher, so
        # that they save and exit 0 and torchrun ends with 0 too (a signalled torchrun exits 1 with a traceback)
        groups = _rank_groups(child[0].pid) if launched else []
        for pgid in groups or [child[0].pid]:
            try:
                os.killpg(pgid, signum)
            except ProcessLookupError:  # it has already exited; wait() collects it
                pass

    previous = {}
    for sig in FORWARDED_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, forward)
    try:
        child.append(subprocess.Popen(list(argv), env=env, cwd=cwd, **_own_group_ending_with(os.getpid())))
        for signum in pending:
            forward(signum, None)
        return _exit_code(child[0].wait())  # wait() resumes after each handler runs (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
