"""Why 2-process gloo runs can abort at exit after finishing, and which ending exits cleanly.

    python benchmarks/exit_probe.py [--tries 30] [--endings none,destroy,os_exit]

Each try starts 2 gloo ranks with torchrun. They wrap a layer in DDP, take one step, all-reduce a Python
tensor three times, pass a barrier, then end one of three ways:

    none      no destroy_process_group, normal interpreter exit
    destroy   destroy_process_group() (what accelerator.end_training() does), normal interpreter exit
    settle    destroy_process_group(), gc.collect() and a 0.2 s pause (what AmpSession.close() does with
              > 1 process), normal interpreter exit
    os_exit   destroy_process_group(), flush, os._exit(0) (what the generated train.py does with > 1 process)

It prints, per ending, how many tries exited non-zero and how many of those printed "terminate called
without an active exception" (a rank killed by SIGABRT), and, once, the native threads a rank still has
after destroy_process_group. The mechanism: DDP keeps the process group alive, so gloo's worker threads
(pt_gloo_runloop) outlive end_training(). A worker that drops a finished collective after the main thread
began interpreter finalization must take the GIL to release a Python tensor; Python 3 ends such a thread with
pthread_exit, whose unwind passes a noexcept destructor (~AsyncWork) and calls std::terminate. The barrier does
not help: its work keeps the earlier all-reduce alive and is itself released after the main thread wakes.
Rates depend on how busy the CPU is: on two cores, none and destroy aborted in 1 try in 3 to 1 in 15
(none 13/40 and 2/30, destroy 6/30, 3/30 and 2/25); settle 0/65 (25 beside destroy's 2/25, then 40 alone,
on a 2-core Intel Xeon); os_exit 0/60.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

ENDINGS = ("none", "destroy", "settle", "os_exit")


def worker(ending: str, show_threads: bool) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.ones(2, 4)).sum().backward()
    t = torch.ones(4)
    for _ in range(3):
        dist.all_reduce(t)
    dist.barrier()
    if ending in ("destroy", "settle", "os_exit"):
        dist.destroy_process_group()
    if ending == "settle":  # what AmpSession.close() does with > 1 process: let the workers drop finished work
        import gc

        gc.collect()
        time.sleep(0.2)
    if show_threads and os.environ.get("RANK") == "0":
        tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
        names = sorted(open(f"/proc/self/task/{tid}/comm").read().strip() for tid in tasks)
        print(f"threads after ending {ending!r}: {names}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if ending == "os_exit":
        os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_try(ending: str, show_threads: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "--worker", ending] + (["--show-threads"] if show_threads else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=30)
    parser.add_argument("--endings", default=",".join(ENDINGS))
    parser.add_argument("--worker", choices=ENDINGS, help=argparse.SUPPRESS)
    parser.add_argument("--show-threads", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.show_threads)
        return
    endings = [e for e in args.endings.split(",") if e]
    print(f"{args.tries} tries per ending, 2 gloo ranks each, python {sys.version.split()[0]}")
    for ending in endings:
        failed = aborted = 0
        start = time.perf_counter()
        for i in range(args.tries):
            p = one_try(ending, show_threads=i == 0)
            if i == 0:
                print("  " + next((ln for ln in p.stdout.splitlines() if ln.startswith("threads after")), "?"))
            if p.returncode != 0:
                failed += 1
                aborted += "terminate called without an active exception" in p.stderr
        secs = time.perf_counter() - start
        print(f"{ending:8s} non-zero exits {failed:3d}/{args.tries} ({failed / args.tries:5.1%}), "
              f"of which aborted (SIGABRT) {aborted}   [{secs / args.tries:.1f} s per try]")


if __name__ == "__main__":
    main()
