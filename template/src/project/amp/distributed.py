"""Processes: one small collective at log ticks, Accelerate's state between two runs, a clean end (:func:`run_main`)."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a held lock, a tripped guard, a stop signal)."""
    return any(row[0] for row in gather_rows(accelerator, [float(flag)]))


def gather_rows(accelerator: Any, values: list[Any]) -> list[list[float]]:
    """Every process's ``values`` (floats or 0-dim tensors), one row per process, in one collective (a log tick's)."""
    if accelerator.num_processes == 1:
        return [[float(v) for v in values]]
    import torch  # here, not at the top: run_main serves scripts that parse their arguments before torch loads

    vec = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(accelerator.device).reshape(()) for v in values])
    return accelerator.gather(vec).reshape(accelerator.num_processes, -1).tolist()


PEER = re.compile(r"connection (closed|reset) by peer|broken pipe|NCCL (error|communicator was aborted)|timed out|"
                  r"connection closed", re.I)


def peer_lost(e: BaseException) -> str | None:
    """One line when ``e`` says another process of the run died or stopped answering (with two: which), else None."""
    dist = sys.modules.get("torch.distributed")  # a process group without torchrun's env
    joined = dist is not None and dist.is_available() and dist.is_initialized()
    world = os.environ.get("WORLD_SIZE") or (dist.get_world_size() if joined else 1)
    m = PEER.search(str(e)) if isinstance(e, RuntimeError) and str(world).isdigit() and int(world) > 1 else None
    if m is None:
        return None
    if not (rank := os.environ.get("RANK", "")).isdigit():
        return f"another process of this run died or stopped answering ({m.group(0)}); its own output says why"
    other, said = (f"rank {1 - int(rank)} of 2", f"rank {1 - int(rank)}'s") if int(world) == 2 else (
        f"another of the {world} ranks", "its")
    return f"{other} died or stopped answering ({m.group(0)}), so rank {rank} stops too; {said} own output says why"


def run_main(main: Callable[[], Any]) -> NoReturn:
    """``run_main(main)`` in ``__main__``: exit with ``main()``'s status; with several processes by ``os._exit``."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:
        line = peer_lost(e)  # a peer's death: one line, not the collective's traceback
        print(f"error: {line}", file=sys.stderr) if line else traceback.print_exc()
        code = 1
    code = 0 if code is None else code if isinstance(code, int) else 1  # as sys.exit(code) would end
    with contextlib.suppress(ValueError):  # not the main thread; a Ctrl-C ends at once, no exit handler's traceback
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        atexit._run_exitfuncs()  # logging's shutdown among them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def reset_accelerate(partial: bool = False) -> None:
    """Forget Accelerate's process-wide state (``partial``: its device and process state too) for a new session."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=partial)
    GradientState._reset_state()
