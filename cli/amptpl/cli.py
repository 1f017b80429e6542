"""The ``amptpl`` command line: thin Typer commands over ``render``, ``add`` and ``runner``.

Each command calls one library function and prints its result. Bad input is one red ``Error: ...`` line on
stderr and exit status 2; nothing is written. Nothing here imports torch, and each command imports its
library module (and rich) itself, so ``amptpl new`` and ``amptpl --help`` load only what they use
(``python benchmarks/cli.py`` measures it).
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from . import __version__
from .errors import AmptplError

if TYPE_CHECKING:
    from rich.console import Console

    from .update import Plan

app = typer.Typer(
    name="amptpl",
    help="Mixed-precision training projects on HuggingFace Accelerate: correct, visible, resumable.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _out() -> Console:
    # Made per call, not at import, so it sees the current stdout and environment (NO_COLOR, COLUMNS);
    # soft_wrap keeps a long path on one line.
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"Error: {message}", style="red", markup=False
    )
    raise typer.Exit(code)


# What the user can fix by choosing another place: bad input, exit 2 as for every other bad input (training
# says the same for a read-only out_dir). Anything else is a fault of the machine: exit 1.
_USER_FIXABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})


def _fail_os(exc: OSError, what: str) -> NoReturn:
    """One line for an ``OSError`` while ``what``: the path and the system's words, without ``[Errno N]``."""
    where = f"{exc.filename}: " if exc.filename else ""
    why = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    _fail(f"{what}: {where}{why}", code=2 if exc.errno in _USER_FIXABLE else 1)


def _shown(path: Path) -> str:
    """``path`` as the user would type it from here: relative when it is below the current directory."""
    rel = os.path.relpath(path)
    return shlex.quote(rel if not rel.startswith("..") else str(path.resolve()))


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


def _group(rel: Path) -> str:
    """The summary line a file falls under: itself at the top level, else its top folder or src/<package>/."""
    parts = rel.parts
    if len(parts) == 1:
        return parts[0]
    depth = 2 if parts[0] == "src" and len(parts) > 2 else 1
    return "/".join(parts[:depth]) + "/"


def _launch_hint(files: list[Path], package: str) -> str:
    """The `accelerate launch` line for Next steps, with a launch config the project really has."""
    configs = sorted(p.as_posix() for p in files if p.parent.as_posix() == "configs/accelerate")
    configs = [c for c in configs if c.endswith((".yaml", ".yml"))]
    module = f"-m {package}.train"
    multi_gpu = "configs/accelerate/multi_gpu.yaml"
    if multi_gpu in configs:
        return f"On several GPUs (inside the project):  accelerate launch --config_file {multi_gpu} {module}"
    if configs:
        return f"With Accelerate (inside the project):  accelerate launch --config_file {configs[0]} {module}"
    return f"With Accelerate (inside the project):  accelerate launch {module}"


def _version(value: bool) -> None:
    if value:
        print(f"amptpl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the amptpl version and exit."
        ),
    ] = False,
) -> None:
    """Mixed-precision training projects on HuggingFace Accelerate: correct, visible, resumable."""


@app.command()
def new(
    name: Annotated[
        str, typer.Argument(help="Project (distribution) name, e.g. my-proj; the package is my_proj.")
    ],
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder to create the project in.", show_default=True)
    ] = Path("."),
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write into a non-empty folder: overwrite template files (backing up any that differ), keep others.",
        ),
    ] = False,
    example: Annotated[
        str,
        typer.Option(
            "--example",
            help="What the project trains: bytelm (a byte-level language model on text that needs no download) "
            "or segmentation (a small U-Net on synthetic shapes). It is one swappable part: src/PKG/example/.",
        ),
    ] = "bytelm",
) -> None:
    """Create a mixed-precision training project NAME that trains out of the box, on CPU or GPU."""
    from .render import render_project

    try:
        result = render_project(name, directory, force, example)
    except AmptplError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail_os(exc, "cannot write the project")

    # typer.echo, not rich: `new` prints a few plain lines, and importing rich for them would cost about 20 ms
    # of CPU time, a tenth of the command (benchmarks/cli.py). echo drops the styles off a terminal.
    bold = partial(typer.style, bold=True)
    typer.echo(f"Created {bold(name)} (package {bold(result.package)}) in {result.path.resolve()}")
    groups = Counter(_group(rel) for rel in result.files)
    for key in sorted(groups):
        count = f"  ({_files(groups[key])})" if key.endswith("/") else ""
        typer.echo(f"  {key}{count}")
    if result.unchanged:
        typer.echo(f"{_files(len(result.unchanged))} already identical to the template's, left alone")
    for rel, backup in result.backups.items():
        line = f"  {rel.as_posix()}: overwritten, backup at {backup.as_posix()}"
        typer.echo(line if os.environ.get("NO_COLOR") else typer.style(line, fg="yellow"))
    for rel, backup in result.moved.items():
        line = f"  {rel.as_posix()}: not in this example's template, moved to {backup.as_posix()}"
        typer.echo(line if os.environ.get("NO_COLOR") else typer.style(line, fg="yellow"))

    where = _shown(result.path)
    typer.echo("\n" + bold("Next steps"))
    typer.echo(f"  cd {where}")
    typer.echo('  pip install -e ".[dev]"')
    typer.echo(f"  python -m {result.package}.train")
    typer.echo(f"\nOr run it from here without installing:  amptpl run {where} train.max_steps=200")
    typer.echo(_launch_hint(result.files, result.package))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="[PROJECT] (default: .) then key=value config overrides, e.g. train.max_steps=200.",
            show_default=False,
        ),
    ] = None,
    launch_config: Annotated[
        Path | None,
        typer.Option("--launch-config", help="Run through `accelerate launch --config_file FILE`."),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes", help="Run N processes with `accelerate launch` (CPU ranks without a GPU)."
        ),
    ] = None,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench",
            help="Time fp32/bf16/fp16 (tf32 on CUDA) side by side: `python -m PACKAGE.bench` instead of training;"
            " its options pass through, e.g. --steps 5 --precisions fp32,bf16.",
        ),
    ] = False,
) -> None:
    """Train a generated project: [bold]amptpl run myproj train.max_steps=200 amp.precision=fp16[/].

    Runs `python -m PACKAGE.train` with PROJECT/src on PYTHONPATH (no install needed), or `accelerate launch`
    with --launch-config / --num-processes; `python -m PACKAGE.bench` with --bench. Exits with the run's exit code.
    """
    positional = list(args or [])
    project = "."
    if positional and "=" not in positional[0] and not positional[0].startswith("-"):
        project = positional.pop(0)
    out = _out()

    def echo(line: str) -> None:
        out.print(line, style="dim", markup=False)
        sys.stdout.flush()  # before the child writes to the same stdout

    from rich.console import Console

    from .runner import run_project

    def warn(line: str) -> None:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"warning: {line}", style="yellow", markup=False)

    try:
        code = run_project(project, launch_config, num_processes, positional, echo=echo, bench=bench, warn=warn)
    except AmptplError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot start the run: {exc}", code=1)
    raise typer.Exit(code)


@app.command()
def doctor(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (stable keys: see amptpl/doctor.py) for tools.")
    ] = False,
) -> None:
    """Check this machine for training: versions, devices, bf16/fp16/TF32, the accelerate config, what
    `accelerate launch` starts, what amp.precision=auto picks here and why, and the project in this folder.

    Works without torch (it says how to install it). Exits 1 when something is broken, naming it in one line.
    """
    from .doctor import diagnose, render_text

    report = diagnose()
    if as_json:
        import json

        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        out = _out()
        out.print(f"amptpl doctor (amptpl {__version__})", style="bold", markup=False)
        for line in render_text(report):
            out.print(line, markup=False)
        for line in report.warnings:
            out.print(f"warning: {line}", style="yellow", markup=False)
    if report.problems:
        _fail("broken: " + "; ".join(report.problems), code=1)


@app.command()
def add(
    dest: Annotated[
        Path, typer.Argument(help="Existing package folder of your repo; the core goes to DEST/amp/.")
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="First copy: overwrite files in DEST/amp/ that differ (backed up). Upgrade: ignore git changes.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be written (for an upgrade, the plan); write nothing.")
    ] = False,
    minimal: Annotated[
        Optional[bool],  # noqa: UP045 - typer reads the annotation at run time (Python 3.10 too)
        typer.Option("--minimal/--full", help="The kernel alone, without amp/debug/ (the AMP debugger), or the whole "
                     "core. Default: the whole core, or what an earlier copy in DEST has."),
    ] = None,
) -> None:
    """Copy the AMP core into DEST/amp/ of an existing repo and print the lines to add to its training loop.

    Never overwrites a file you changed unless --force; identical files are left alone. Run again on the same
    DEST to upgrade the core: files you did not change are replaced, files you changed are merged.
    """
    from .add import SNIPPET, add_core
    from .update import plan_table

    try:
        result = add_core(dest, force, dry_run, minimal)
    except AmptplError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail_os(exc, "cannot copy the AMP core")

    out = _out()
    if result.upgrade is not None and result.upgrade.shown:
        out.print(plan_table(result.upgrade, _plan_title(result.upgrade, "Upgraded the AMP core in", dry_run)))
    unchanged = f", {_files(len(result.unchanged))} already up to date" if result.unchanged else ""
    verb = "Would copy" if dry_run else "Copied"
    written = "to write (dry run: nothing written)" if dry_run else "written"
    out.print(
        f"{verb} the AMP core to {_shown(result.path)}: {_files(len(result.files))} {written}{unchanged}",
        markup=False,
    )
    for rel in result.files:
        backup = result.backups.get(rel)
        note = f": overwritten, backup at {backup.as_posix()}" if backup else ""
        out.print(f"  {rel.as_posix()}{note}", markup=False)
    # Plain text, verbatim: the diffs must survive a copy-paste into `patch -p1 YOUR_SCRIPT.py`.
    out.print("\nAdd to your training loop the + lines below (diffs against typical scripts):\n", markup=False)
    out.print(SNIPPET, markup=False, end="")
    if result.upgrade is not None and _print_conflicts(out, result.upgrade, dry_run) and not dry_run:
        raise typer.Exit(1)


@app.command()
def update(
    project: Annotated[Path, typer.Argument(metavar="PROJECT", help="The project folder (default: the current one).")] = Path("."),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (file, action); write nothing.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Update even though git shows uncommitted changes in the project.")
    ] = False,
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt",
            help="Take the current files as the base (a project made before `update` existed): files that differ"
            " from the template are replaced, each backed up next to itself.",
        ),
    ] = False,
) -> None:
    """Update a generated project to this amptpl's template, keeping your edits.

    Replaces files you did not change, keeps files only you changed, merges files you both changed
    (conflict markers where you changed the same lines: listed at the end, exit code 1).
    Adds new template files; files you deleted stay deleted; files the template dropped are removed
    unless you changed them. Refuses uncommitted git changes in the project unless --force.
    """
    from .update import plan_table, update_project

    try:
        plan = update_project(project, dry_run=dry_run, force=force, adopt=adopt)
    except AmptplError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(
            "interrupted: each file is either old or new and .amptpl.json is unchanged; run the update again to "
            "finish (with --force if git now shows the files it wrote)",
            code=130,
        )
    except OSError as exc:
        _fail_os(exc, "cannot update the project")

    out = _out()
    if not plan.shown:
        out.print(f"{_shown(plan.root)} is up to date with amptpl {plan.to_version}", markup=False)
    else:
        out.print(plan_table(plan, _plan_title(plan, "Updated", dry_run)))
        if plan.up_to_date:
            out.print(f"{_files(plan.up_to_date)} already up to date", markup=False)
    if _print_conflicts(out, plan, dry_run) and not dry_run:
        raise typer.Exit(1)


def _plan_title(plan: Plan, done: str, dry_run: bool) -> str:
    versions = f"amptpl {plan.from_version} -> {plan.to_version}"
    if dry_run:
        return f"Plan for {_shown(plan.root)}: {versions} (dry run: nothing written)"
    return f"{done} {_shown(plan.root)}: {versions}"


def _print_conflicts(out: Console, plan: Plan, dry_run: bool) -> bool:
    """List what is left to resolve last, where it is seen: a damaged base, files still holding an earlier
    update's markers, this update's conflicts. True when anything is left (the command then exits 1)."""
    if plan.damaged_base:
        out.print(
            f"\nwarning: {plan.root / '.amptpl' / 'base.zip'} cannot be read ({plan.damaged_base}): files you and "
            "amptpl both changed could not be merged; amptpl's version of each is in the .amptpl-new file named "
            "below. The next update records a fresh base.",
            style="yellow", markup=False,
        )  # fmt: skip
    if plan.unresolved:
        names = ", ".join(rel.as_posix() for rel in plan.unresolved)
        out.print(
            f"\nwarning: {_files(len(plan.unresolved))} still {'holds' if len(plan.unresolved) == 1 else 'hold'} "
            f"the conflict markers of an earlier update: {names}; "
            "resolve each <<<<<<< ======= >>>>>>> block (keep the lines you want, delete the markers)",
            style="yellow", markup=False,
        )  # fmt: skip
    if not plan.conflicts:
        return bool(plan.unresolved)
    n = _files(len(plan.conflicts))
    marked = any(c.beside is None for c in plan.conflicts)
    beside = any(c.beside is not None for c in plan.conflicts)
    todo = "; ".join(
        ["resolve the <<<<<<< ======= >>>>>>> markers"] * marked
        + ["merge amptpl's version from the .amptpl-new file named beside it"] * beside
    )
    head = f"{n} would conflict" if dry_run else f"Conflicts in {n}: {todo}"
    out.print(f"\n{head}:", style="bold red", markup=False)
    for change in plan.conflicts:
        note = f"  ({change.note})" if change.note else ""
        out.print(f"  {change.path.as_posix()}{note}", markup=False)
    return True
