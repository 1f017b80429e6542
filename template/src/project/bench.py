"""Time this project's training step in each precision on this machine, side by side.

``python -m PACKAGE.bench [--precisions fp32,bf16] [key=value ...]``: one fresh process per precision (doctor.md)."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import example
from .amp import LoopError, RunLockedError, precision
from .amp.console import fmt_duration
from .amp.debug import autopick
from .amp.hooks import Hooks
from .amp.settings import env_flag
from .config import Config, ConfigError, ConfigExit, parse_args, to_dict
from .configparse import UsageError, UsageParser
from .steps import PACKAGE, auto_probe, build_model, build_optimizer, build_run, child_env, scratch_session, train_step

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-true", "tf32")
ROW_PREFIX = '{"bench_row": '  # the one stdout line of a worker that the parent reads
# at worst, how much slower than fp32 a CPU without fast kernels runs these (the estimate line's; often nearer 2x)
SLOWDOWN = {"fp16": 30.0, "bf16": 10.0, "bf16-true": 10.0}


def parse(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """Bench options and the config as train.py reads it; ``opts.config_args`` hands the config's arguments on."""
    p = UsageParser(prog=f"python -m {PACKAGE}.bench", description=__doc__.split("\n\n")[0], epilog="key=value and "
                    f"--config FILE set the config as for training (python -m {PACKAGE}.train --help)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported (default 3)")
    p.add_argument("--precisions", help="comma-separated: fp32,bf16,fp16,bf16-true,tf32 (default all but tf32; tf32 "
                   "too on CUDA)")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE", help="a YAML config file; may repeat")
    p.add_argument("--json", metavar="FILE", help="where to write the results (default out_dir/bench.json)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the step times and speed-ups (needs matplotlib)")
    p.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)  # auto's measurement: comma-separated candidates
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=64")
    opts = p.parse_intermixed_args(argv)
    for flag, value, low in (("--steps", opts.steps, 1), ("--warmup", opts.warmup, 0), ("--repeats", opts.repeats, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    for o in opts.overrides:
        if "=" not in o or o.startswith("="):
            raise UsageError(f"{o!r}: not a key=value override or a bench option (see --help)")
    opts.config_args = [a for path in opts.config for a in ("--config", path)] + opts.overrides
    opts.probe = _precisions(opts.probe) if opts.probe else None
    opts.precisions = None if opts.precisions is None else _precisions(opts.precisions)  # None: run decides
    return opts, parse_args(opts.config_args)


def _precisions(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--precisions: give at least one of {', '.join(PRECISIONS)}")
    for n in names:
        if n not in PRECISIONS:
            raise UsageError(f"--precisions: {n!r} is not one of {', '.join(PRECISIONS)}")
    # fp32 first: the reference for the ratios, and the time the estimates of slow precisions start from
    return ["fp32"] + [n for i, n in enumerate(names) if n != "fp32" and n not in names[:i]]


def device_note(prec: str, device: Any) -> str:
    """Empty when ``prec`` runs natively on ``device``; else why its number is not a real speed (or ``n/a``)."""
    kind = torch.device(device).type
    if prec == "tf32":
        ampere = kind == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return "" if ampere else "n/a: TF32 needs an Ampere+ CUDA GPU"
    if kind == "cpu" and prec in ("bf16", "bf16-true") and precision.cpu_bf16_feature() is None:
        return "emulated (no AVX512-BF16/AMX): slow by design"
    if kind == "cpu" and prec == "fp16":
        return "no fast fp16 CPU kernels: correctness path"
    if kind == "cuda" and prec in ("bf16", "bf16-true") and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "emulated (no native bf16 on this GPU): slow by design"
    return ""


def _sync(device: Any) -> None:
    """Wait for the device's queued work (CPU ops are synchronous)."""
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def _peak_memory(device: Any) -> tuple[float | None, str]:
    """Peak memory in MiB and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Unix
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS of the process"


def measure(prec: str, cfg: Config, opts: argparse.Namespace) -> dict[str, Any]:
    """One precision's row: steps.py's scratch run, warmed up, then the timed blocks."""
    with scratch_session(cfg, "fp32" if prec == "tf32" else prec) as amp:
        device = amp.accelerator.device
        auto = precision.resolve("auto", device)
        row = {"precision": prec, "effective": amp.resolution.effective, "device": str(device),
               "note": device_note(prec, device), "auto": {"pick": auto.effective, "reason": auto.reason}}
        if row["note"].startswith("n/a"):
            return {**row, "status": "n/a"}
        # fp32 is TF32-free; tf32 is fp32 with TF32 on; bf16/fp16 keep amp.tf32 for their fp32 parts, as in training
        precision.set_tf32(prec == "tf32" or (prec not in ("fp32", "tf32") and cfg.amp.tf32), cfg.amp.cudnn_benchmark)
        model, optimizer, scheduler, batches = build_run(cfg, amp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss, times, samples, tokens = None, [], [], []
        try:
            for _ in range(opts.warmup):
                loss = train_step(amp, model, optimizer, scheduler, batches, cfg)
            _sync(device)
            for _ in range(opts.repeats):  # the device is synchronised only at the end of each block
                seen, t0 = amp.summary(), time.perf_counter()
                for _ in range(opts.steps):
                    loss = train_step(amp, model, optimizer, scheduler, batches, cfg)
                _sync(device)
                dt, now = time.perf_counter() - t0, amp.summary()
                times.append(dt / opts.steps)
                samples.append((now["samples_seen"] - seen["samples_seen"]) / dt)
                tokens.append((now["tokens_seen"] - seen["tokens_seen"]) / dt)
        except torch.cuda.OutOfMemoryError:
            return {**row, "status": "oom", "note": "out of memory"}
        summary = amp.summary()  # the skipped-step count: one read, after the timing
        row.update(step_time_s=statistics.median(times), step_time_min_s=min(times), step_time_max_s=max(times),
                   step_times_s=times, samples_per_s=statistics.median(samples), tokens_per_s=statistics.median(tokens),
                   loss=float(loss), status="ok", skipped_steps=summary["amp/skipped_steps"], steps=amp.step,
                   scale=summary["amp/scale"])
        row["peak_mem_mib"], row["peak_mem_kind"] = _peak_memory(device)
    return row


PROBE_PREFIX = '{"probe": '
PROBE_WARMUP, PROBE_ROUNDS, PROBE_STEPS = 1, 3, 2  # auto's measurement, per candidate: 1 + 3 x 2 optimizer steps


def probe_times(candidates: list[str], cfg: Config) -> dict[str, float]:
    """auto's measurement, in the child of steps.run_probe: a few steps of each candidate under its autocast (fp16 with
    a scaler, bf16-true with the core's masters), interleaved so that a busy moment hits every candidate alike."""
    accelerator = Accelerator(cpu=env_flag("ACCELERATE_USE_CPU") or not precision.has_accelerator(),
                              mixed_precision="no")
    device = accelerator.device
    precision.set_tf32(cfg.amp.tf32, cfg.amp.cudnn_benchmark)
    set_seed(cfg.seed)
    loader, _, _ = example.build_data(cfg, accelerator)
    models, optimizers = {}, {}
    for which in ("mixed", "true") if "bf16-true" in candidates else ("mixed",):
        set_seed(cfg.seed)
        models[which] = build_model(cfg)
        optimizers[which] = build_optimizer(cfg, models[which], 1)[0]
    if "true" in models:  # bf16 weights, float32 masters in its optimizer: the session's own feature (amp/master.py)
        settings = replace(cfg.amp, precision="bf16-true", audit="off", meters=False)
        Hooks(accelerator, settings, precision.resolve("bf16-true", device), print).before_prepare(
            [models["true"]], [optimizers["true"]])
    for net in models.values():
        net.to(device)
    scalers = {p: torch.amp.GradScaler(device.type, enabled=p == "fp16") for p in candidates}  # disabled: a plain step
    batches = (b for _ in iter(int, 1) for b in loader)  # endless

    def step(prec: str) -> None:
        batch = send_to_device(next(batches), device)
        which = "true" if prec == "bf16-true" else "mixed"
        net, optimizer = models[which], optimizers[which]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = example.loss(net, batch)  # the example's loss is float32 whatever the autocast
        scalers[prec].scale(loss).backward()
        scalers[prec].step(optimizer)
        scalers[prec].update()
        optimizer.zero_grad(set_to_none=True)

    for prec in candidates * PROBE_WARMUP:
        step(prec)
    times: dict[str, list[float]] = {p: [] for p in candidates}
    for r in range(PROBE_ROUNDS):
        for prec in candidates[r % len(candidates):] + candidates[: r % len(candidates)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(PROBE_STEPS):
                step(prec)
            _sync(device)
            times[prec].append((time.perf_counter() - t0) / PROBE_STEPS)
    return {p: statistics.median(ts) for p, ts in times.items()}


def run_worker(prec: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Run one precision in a fresh process; its row, or a failed row with the worker's last error line."""
    argv = [sys.executable, "-m", f"{PACKAGE}.bench", "--worker", prec, "--steps", str(opts.steps),
            "--warmup", str(opts.warmup), "--repeats", str(opts.repeats), *opts.config_args]
    proc = subprocess.run(argv, env=child_env(drop=()), capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_PREFIX):
            return json.loads(line)["bench_row"]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(errors) if ln.startswith("error:")), errors[-1] if errors else "no output")
    if proc.returncode == 2 and last.startswith("error:"):
        raise UsageError(last.removeprefix("error:").strip())
    return {"precision": prec, "status": "failed", "note": f"exit code {proc.returncode}: {last.strip()[:200]}"}


def _estimate(prec: str, rows: list[dict[str, Any]], opts: argparse.Namespace, device_type: str) -> str | None:
    """One line before a precision this CPU runs slowly, with the time it may take."""
    note = device_note(prec, "cpu") if device_type == "cpu" and prec in SLOWDOWN else ""
    if not note:
        return None
    ref = next((r for r in rows if r["precision"] == "fp32" and r.get("status") == "ok"), None)
    steps = opts.warmup + opts.steps * opts.repeats
    guess = "" if ref is None else (f"; it may run up to ~{SLOWDOWN[prec]:.0f}x slower than fp32: up to about "
                                    f"{fmt_duration(ref['step_time_s'] * SLOWDOWN[prec] * steps)} for {steps} steps")
    return f"{prec}: {note}{guess} (fewer --steps/--repeats, or leave it out of --precisions, to save time)"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up (fp32 step time / this one) and memory ratio (this / fp32) on every measured row."""
    ref = next((r for r in rows if r["precision"] == "fp32" and r.get("status") == "ok"), None)
    for r in rows:
        ok = ref is not None and r.get("status") == "ok"
        r["speedup_vs_fp32"] = ref["step_time_s"] / r["step_time_s"] if ok else None
        mem, ref_mem = r.get("peak_mem_mib"), ref.get("peak_mem_mib") if ref else None
        r["memory_vs_fp32"] = mem / ref_mem if ok and mem and ref_mem else None


def verdict(rows: list[dict[str, Any]], asked: list[str] | None = None) -> dict[str, Any]:
    """One sentence: the precision ``amp.precision=auto`` trains in here and how it compares with the fastest measured;
    the keys: auto's hardware rule (pick, reason), the fastest, whether the rule agrees, what timed auto runs."""
    auto = next((r["auto"] for r in rows if "auto" in r), None)
    if auto is None:
        return {"pick": None, "reason": None, "fastest": None, "agrees": None, "text": "no precision was measured"}
    out = {**auto, "fastest": None, "agrees": None}
    timings = _timings(rows, asked)  # the precisions auto may run here (not fp16 on a CPU, nothing emulated)
    rule = precision.Resolution("auto", auto["pick"], auto["reason"], "cpu")
    runs = autopick.decide(rule, timings, cached=False) if len(timings) >= 2 else rule  # timed where 2 can be
    if len(timings) >= 2:
        out["timed_pick"] = runs.effective
    text = f"amp.precision=auto {'trains in' if runs is not rule else 'picks'} {runs.effective} here ({runs.reason})"
    if not timings:
        return {**out, "text": f"{text}; nothing it may run was measured to compare"}
    fastest = min(timings, key=timings.get)
    out["fastest"] = fastest
    if runs.effective not in timings:
        return {**out, "text": f"{text}; {runs.effective} was not measured (add it to --precisions)"}
    ratio = timings[runs.effective] / timings[fastest]
    out["agrees"] = auto["pick"] in timings and timings[auto["pick"]] <= timings[fastest] * (1 + autopick.NOISE)
    if fastest == runs.effective:
        text += ": the fastest measured"
    elif ratio <= 1 + autopick.NOISE:
        text += f": {fastest} measured {100 * (ratio - 1):.1f}% faster, within the {100 * autopick.NOISE:.0f}% noise"
    else:
        text += f": {fastest} measured {ratio:.2f}x faster (amp.precision={fastest} runs it)"
    if runs.effective != auto["pick"]:
        text += f"; untimed (amp.auto.measure=false) it would be {auto['pick']} ({auto['reason']})"
    return {**out, "text": text}


def _timings(rows: list[dict[str, Any]], asked: list[str] | None = None) -> dict[str, float]:
    """The step times auto's measurement would weigh: fp32 and the asked or native (never emulated) precisions."""
    cuda = any(str(r.get("device", "")).startswith("cuda") for r in rows)
    allowed = ["fp32", *asked] if asked else ("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16")
    return {r["precision"]: r["step_time_s"] for r in rows
            if r.get("status") == "ok" and r["precision"] in allowed and not r.get("note")}


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def table(rows: list[dict[str, Any]], title: str) -> Any:
    """The rich table: one row per precision, the ratios against fp32 beside its numbers; notes go below it."""
    t = Table(title=title, box=box.SIMPLE_HEAD, caption_justify="left")
    for name in ("precision", "ms/step\n(min-max)", "samples/s", "tokens/s", "peak\nMiB", "loss", "skipped",
                 "speed-up\nvs fp32", "memory\nvs fp32"):
        t.add_column(name, justify="left" if name == "precision" else "right", no_wrap=True)
    notes = []
    for r in rows:
        name = r["precision"]
        if r.get("note"):
            notes.append(f"{name}: {r['note']}")
            name += " *"
        if r.get("status") != "ok":
            t.add_row(name, r.get("status", "-"), *["-"] * 7)
            continue
        ms = f"{1e3 * r['step_time_s']:.1f} ({1e3 * r['step_time_min_s']:.1f}-{1e3 * r['step_time_max_s']:.1f})"
        t.add_row(name, ms, f"{r['samples_per_s']:,.1f}", _cell(r["tokens_per_s"] or None, ",.0f"),
                  _cell(r.get("peak_mem_mib"), ",.0f"), _cell(r.get("loss"), ".4f"), f"{r['skipped_steps']}/"
                  f"{r['steps']}", _cell(r["speedup_vs_fp32"], ".2f", "x"), _cell(r["memory_vs_fp32"], ".2f", "x"))
    if notes:  # a worker's error line may hold [brackets]: text, not markup
        t.caption = "\n".join(f"* {escape(n)}" for n in notes)
    return t


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Step time per precision (bars, min-max whiskers) and the speed-up against fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    names = [r["precision"] for r in ok]
    err = [[1e3 * (r["step_time_s"] - r["step_time_min_s"]) for r in ok],
           [1e3 * (r["step_time_max_s"] - r["step_time_s"]) for r in ok]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [1e3 * r["step_time_s"] for r in ok], yerr=err, capsize=4, color="#4c72b0")
    a.set_ylabel("ms per optimizer step (median, min-max)")
    b.bar(names, [r["speedup_vs_fp32"] or 0 for r in ok], color="#55a868")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_ylabel("speed-up vs fp32")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _remember(cfg: Config, device_type: str, rows: list[dict[str, Any]]) -> None:
    """Put the measured step times where ``auto`` looks first (its cache): the next run of this model costs nothing."""
    probe, timings = auto_probe(cfg), _timings(rows, cfg.amp.auto.candidates)
    if probe and cfg.amp.auto.measure and len(timings) >= 2 and device_type in ("cpu", "cuda"):
        probe = autopick.Probe(probe.run, probe.key, cfg.amp.auto.candidates or None)  # as the session keys it
        autopick.store(autopick.probe_key(device_type, probe), timings, {"from": "bench", "probe": probe.key})


def _check_outputs(plot_path: str | None, path: Path) -> None:
    """--plot's matplotlib and a writable --json folder: one line now, not a traceback after the whole benchmark."""
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    if path.is_dir():
        raise UsageError(f"--json: {path} is a directory; give a file path such as {path / 'bench.json'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--json: {parent} is a file, not a directory")
    if parent is not None:  # a probe file
        try:
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            raise UsageError(f"--json: cannot write under {parent} ({e.strerror or e})") from None


def run(opts: argparse.Namespace, cfg: Config) -> int:
    """Every precision in its own worker, then the table, the verdict, bench.json and the plot."""
    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, soft_wrap=True, width=120)  # a log file or pipe: the whole table
    json_path = Path(opts.json) if opts.json else Path(cfg.out_dir) / "bench.json"
    _check_outputs(opts.plot, json_path)
    cpu = env_flag("ACCELERATE_USE_CPU") or not precision.has_accelerator()  # the workers' device, GPU untouched
    device_type = "cpu" if cpu else "cuda" if torch.cuda.is_available() else "other"
    if opts.precisions is None:
        opts.precisions = ["fp32", "bf16", "fp16", "bf16-true"] + (["tf32"] if device_type == "cuda" else [])
    t, m = cfg.train, cfg.model
    setup = (f"{opts.warmup} warm-up + {opts.repeats} x {opts.steps} timed optimizer steps; batch {t.batch_size} "
             f"x grad_accum {t.grad_accum}; {' '.join(f'{k}={v}' for k, v in asdict(m).items())}")
    out.print(f"bench: {setup}", markup=False)
    rows: list[dict[str, Any]] = []
    for i, prec in enumerate(opts.precisions, 1):
        if prec == "tf32" and device_type != "cuda":
            rows.append({"precision": "tf32", "status": "n/a", "note": device_note("tf32", "cpu")})
            continue
        if line := _estimate(prec, rows, opts, device_type):
            out.print(line, style="yellow", markup=False)
        tag, t0 = f"[{i}/{len(opts.precisions)}] {prec}", time.perf_counter()
        out.print(f"{tag} ...", markup=False)
        rows.append(run_worker(prec, opts))
        out.print(f"{tag}: {rows[-1]['status']} in {fmt_duration(time.perf_counter() - t0)}", markup=False)
    add_ratios(rows)
    v = verdict(rows, cfg.amp.auto.candidates)
    device = next((r["device"] for r in rows if "device" in r), device_type)
    _remember(cfg, device_type, rows)
    out.print(table(rows, f"bench: {PACKAGE} on {device}"))
    out.print(v["text"], markup=False)
    if device_type == "cpu":
        out.print("peak memory on a CPU is the worker's peak RSS, interpreter and libraries included: the ratios "
                  "understate the difference in the model's own memory", style="dim", markup=False)
    settings = {"steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats, "precisions": opts.precisions,
                "args": opts.config_args}
    report = {"package": PACKAGE, "device": device, "device_type": device_type, "torch": torch.__version__,
              "settings": settings, "config": to_dict(cfg), "auto": v, "rows": rows}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")  # written whole, then renamed into place
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, json_path)
    out.print(f"wrote {json_path}", markup=False)
    if opts.plot:
        plot(Path(opts.plot), rows, f"{PACKAGE} on {device}: {setup}")
        out.print(f"wrote {opts.plot}", markup=False)
    return 1 if any(r.get("status") == "failed" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    try:
        opts, cfg = parse(sys.argv[1:] if argv is None else argv)
        if opts.probe:
            print(PROBE_PREFIX + json.dumps(probe_times(opts.probe, cfg)) + "}", flush=True)
            return 0
        if opts.worker:  # one precision's row as one JSON line
            print(ROW_PREFIX + json.dumps(measure(opts.worker, cfg, opts)) + "}", flush=True)
            return 0
        return run(opts, cfg)
    except ConfigExit as e:
        print(e.text)
        return 0
    except (UsageError, ConfigError, example.DataError, RunLockedError, LoopError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the worker got the same Ctrl-C; nothing of its run is kept
        print("bench: interrupted; no results written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
