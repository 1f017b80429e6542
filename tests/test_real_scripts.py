"""The copied core in two real training scripts, put in exactly as docs/copying-the-core.md says; one test per row
of what went wrong when a new user did that with public scripts.

``tests/loops/gpt_prefetch.py`` (with ``gpt_model.py``) is shaped like nanoGPT's train.py: module-level code, its own
DDP, autocast, GradScaler and ``loss / grad_accum`` removed as the docs' "A script with its own AMP" says, random
batches from a memory-mapped token file, a batch drawn ahead right after the forward, a ``while True:`` loop that
never looks at ``after_step``'s value, a tied embedding. ``tests/loops/lm_no_trainer.py`` is shaped like Transformers'
run_clm_no_trainer.py: argparse flags, its own ``accelerator.init_trackers``, ``completed_steps``, the final model and
``all_results.json`` after the loop. Every run here is a subprocess started the way users start these scripts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _runs import Started, assert_same_weights, child_pids, cpu_ranks, gone, latest, launch, log_lines, sealed

LOOPS = Path(__file__).parent / "loops"
COPYING = Path(__file__).resolve().parents[1] / "docs" / "copying-the-core.md"
GPT, LM = "gpt_prefetch.py", "lm_no_trainer.py"
STOPPED = re.compile(r"stopped by SIGTERM at step (\d+); state saved to (\S+)")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks through /proc")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A user's repository: the scripts, and the AMP core copied next to them by ``amptpl add``."""
    root = tmp_path_factory.mktemp("repo")
    p = subprocess.run([sys.executable, "-m", "amptpl", "add", str(root)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    for script in LOOPS.glob("*.py"):
        (root / script.name).write_text(script.read_text())
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Offline, unbuffered, no launcher settings of the user's; one intra-op thread per process (2 cores, shared)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k != "PYTHONPATH"}
    e.update(HF_HOME=str(tmp_path_factory.mktemp("hf-home")), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200", OMP_NUM_THREADS="1")
    return e


def gpt(script: Path, *overrides: str) -> list[str]:
    """nanoGPT's command line: ``--key=value`` overrides; every run here may resume (``init_from='resume'``)."""
    return [sys.executable, str(script), "--init_from=resume", *overrides]


def lm(script: Path, *flags: str) -> list[str]:
    return [sys.executable, str(script), "--output_dir", "out", "--max_train_steps", "40", "--checkpointing_steps",
            "10", *flags]


def fp16(env: dict[str, str]) -> dict[str, str]:
    """The LM script's precision is the launcher's (``accelerate launch --mixed_precision fp16`` sets this)."""
    return {**env, "ACCELERATE_MIXED_PRECISION": "fp16"}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def patched(repo: Path, tmp_path: Path, name: str, *edits: tuple[str, str]) -> Path:
    """``repo/name`` with each ``old`` replaced by ``new`` (each must be there), written to ``tmp_path``."""
    text = (repo / name).read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / name).write_text(text)
    for other in ("amp", "gpt_model.py"):
        (tmp_path / other).symlink_to(repo / other)
    return tmp_path / name


def stopped_at(output: str, out: Path) -> Path:
    """The checkpoint a SIGTERM stop saved: named by the stop line, complete, and the latest."""
    m = STOPPED.search(output)
    assert m, output
    saved = out / "checkpoints" / f"step_{int(m.group(1)):07d}"
    assert latest(out) == saved.name and json.loads((saved / "meta.json").read_text())["complete"] is True
    return saved


@dataclass
class Done:
    cwd: Path
    output: str


@pytest.fixture(scope="module")
def straight_gpt(repo, env, tmp_path_factory) -> Done:
    """gpt_prefetch.py from start to end in fp16, uninterrupted (the reference of the resume tests)."""
    cwd = tmp_path_factory.mktemp("straight-gpt")
    p = run(gpt(repo / GPT), cwd, env)
    assert p.returncode == 0, p.stdout + p.stderr
    return Done(cwd, p.stdout + p.stderr)


@pytest.fixture(scope="module")
def finished_lm(repo, env, tmp_path_factory) -> Done:
    """lm_no_trainer.py with its TensorBoard tracking, from start to end in fp16."""
    cwd = tmp_path_factory.mktemp("finished-lm")
    p = run(lm(repo / LM, "--with_tracking", "--report_to", "tensorboard"), cwd, fp16(env))
    assert p.returncode == 0, p.stdout + p.stderr
    return Done(cwd, p.stdout + p.stderr)


# ------------------------------------------------------------------------------------------ row 1: a stop ends it


def test_row1_sigterm_ends_a_loop_that_never_looks_with_exit_0_and_a_complete_checkpoint(repo, env, tmp_path):
    run_ = Started(gpt(repo / GPT), tmp_path, env)
    run_.wait_until(lambda: "iter 5:" in run_.output, "iter 5")
    os.kill(run_.proc.pid, signal.SIGTERM)
    assert run_.finish(timeout=120) == 0, run_.output
    saved = stopped_at(run_.output, tmp_path / "out")
    assert int(saved.name[5:]) < 41 and not (tmp_path / "out" / "amp_summary.json").exists()
    assert "(amp.resume continues from it)" in run_.output


def test_row1_a_second_sigterm_inside_estimate_loss_ends_the_process_at_once(repo, env, straight_gpt, tmp_path):
    """Resumed at step 41 with evaluations every 2 steps: SIGTERM as the session starts stops the run at step 42,
    whose estimate_loss() (slow: 4000 batches a split) the loop goes into; a second SIGTERM 1 s or more after the
    first kills it there."""
    for name in ("out", "data"):
        shutil.copytree(straight_gpt.cwd / name, tmp_path / name)
    run_ = Started(gpt(repo / GPT, "--max_iters=60", "--eval_interval=2", "--eval_iters=4000"), tmp_path, env)
    run_.wait_until(lambda: "precision: " in run_.output, "the session")  # its signal handlers are in place
    first = time.monotonic()
    os.kill(run_.proc.pid, signal.SIGTERM)
    run_.wait_until(lambda: STOPPED.search(run_.output), "the stop")
    assert STOPPED.search(run_.output).group(1) == "42", run_.output
    time.sleep(max(0.2, first + 1.2 - time.monotonic()))  # later than a launcher's forwarded copy of the first
    second = time.monotonic()
    os.kill(run_.proc.pid, signal.SIGTERM)
    assert run_.finish(timeout=60) == -signal.SIGTERM, run_.output
    assert time.monotonic() - second < 10, "the second SIGTERM did not end the process at once"
    assert "SIGTERM again: ending now, without saving" in run_.output
    assert "step 42: train loss" not in run_.output, "estimate_loss() finished: the kill came after it"
    assert latest(tmp_path / "out") == "step_0000042"


# ------------------------------------------------------------------------------------------ row 2: the prefetch


def prefetch_lines() -> list[str]:
    """The docs' code for the batch drawn ahead: the lines that mention ``ahead`` (the rest is the script's own)."""
    block = docs_blocks("A script with its own AMP", "ahead = amp.track(")[0]
    return [line.strip() for line in block.splitlines() if "ahead" in line]


AHEAD_WARNING = "warning: the global RNG moved between the step's last forward and amp.after_step"


def test_row2_a_prefetch_the_checkpoint_does_not_hold_is_warned_about_once(repo, env, straight_gpt, tmp_path):
    track, first, keep = prefetch_lines()
    script = patched(repo, tmp_path, GPT, (track + "\n", ""), (first, 'X, Y = get_batch("train")'),
                     (keep + "\n", "\n"))
    p = run(gpt(script, "--max_iters=5"), tmp_path, env)
    assert p.returncode == 0, p.stdout + p.stderr
    warnings = [ln for ln in p.stdout.splitlines() if AHEAD_WARNING in ln]
    assert len(warnings) == 1 and "amp.track" in warnings[0], p.stdout
    assert AHEAD_WARNING not in straight_gpt.output  # with the docs' three lines: no warning


def test_row2_with_the_documented_lines_sigkill_then_the_same_command_ends_bitwise_equal(repo, env, straight_gpt,
                                                                                         tmp_path):
    final = latest(straight_gpt.cwd / "out")
    run_ = Started(gpt(repo / GPT), tmp_path, env)
    run_.wait_until((tmp_path / "out" / "checkpoints" / "latest").exists, "the first checkpoint")
    run_.kill_everything(1)
    killed_at = sealed(tmp_path / "out")
    assert killed_at < final, "the kill came after the run had finished: nothing was tested"
    resumed = run(gpt(repo / GPT), tmp_path, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume: loaded {Path('out', 'checkpoints', killed_at)}" in resumed.stdout, resumed.stdout
    assert latest(tmp_path / "out") == final
    assert_same_weights(straight_gpt.cwd / "out" / "checkpoints" / final, tmp_path / "out" / "checkpoints" / final)


# ------------------------------------------------------------------------------------------ row 5: two scalers


def test_row5_its_own_gradscaler_kept_is_one_loop_error_at_the_first_step(repo, env, tmp_path):
    script = patched(repo, tmp_path, GPT,
                     ("model, optimizer = amp.prepare(", 'scaler = torch.amp.GradScaler("cpu")\nmodel, optimizer = '
                                                         "amp.prepare("),
                     ("accelerator.backward(loss)", "accelerator.backward(scaler.scale(loss))"))
    p = run(gpt(script, "--max_iters=5"), tmp_path, env)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "LoopError: fp16: the loss was scaled twice: your own GradScaler `scaler` scaled it" in last, p.stderr
    assert not log_lines(p.stdout), "it trained on before saying so"


# ------------------------------------------------------------------------------------------ row 7: tied weights


def test_row7_the_tied_weight_is_saved_once_and_the_docs_load_model_line_ties_it_again(straight_gpt):
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(LOOPS))
    try:
        from gpt_model import GPT as Model
        from gpt_model import GPTConfig
    finally:
        sys.path.remove(str(LOOPS))
    ckpt = straight_gpt.cwd / "out" / "checkpoints" / latest(straight_gpt.cwd / "out")
    path = str(ckpt / "model.safetensors")
    saved = load_file(path)
    assert "wte.weight" in saved and "lm_head.weight" not in saved
    assert "Removed shared tensor {'lm_head.weight'} while saving" in straight_gpt.output
    config = json.loads((ckpt / "meta.json").read_text())["config"]
    model = Model(GPTConfig(**{k: config[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "bias")}))
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "lm_head.weight"'):
        model.load_state_dict(saved)
    exec(docs_blocks("A script with its own AMP", "load_model(")[0], {"model": model, "path": path})  # as written
    assert model.lm_head.weight is model.wte.weight and torch.equal(model.wte.weight, saved["wte.weight"])


# ------------------------------------------------------------------------------------------ rows 10, 16: after the loop


def test_row10_the_finished_command_again_trains_nothing_and_rewrites_nothing(finished_lm, env, repo, tmp_path):
    cwd = tmp_path / "run"
    shutil.copytree(finished_lm.cwd, cwd)  # times kept
    out = cwd / "out"
    before = {f: ((out / f).stat().st_mtime_ns, (out / f).read_bytes()) for f in
              ("model.safetensors", "all_results.json", "metrics.jsonl")}
    p = run(lm(repo / LM, "--with_tracking", "--report_to", "tensorboard"), cwd, fp16(env))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing to do: resumed at step 40, the step budget (max_steps) is 40" in p.stdout, p.stdout
    assert not log_lines(p.stdout) and latest(out) == "step_0000040"
    assert {f: ((out / f).stat().st_mtime_ns, (out / f).read_bytes()) for f in before} == before
    assert not (out / ".lock").exists()


def test_row10_the_gpt_scripts_while_true_loop_run_again_after_it_finished_trains_nothing(repo, env, straight_gpt,
                                                                                         tmp_path):
    for name in ("out", "data"):
        shutil.copytree(straight_gpt.cwd / name, tmp_path / name)
    p = run(gpt(repo / GPT), tmp_path, env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing to do: resumed at step 41, the step budget (max_steps) is 41" in p.stdout, p.stdout
    assert not log_lines(p.stdout) and "iter " not in p.stdout and latest(tmp_path / "out") == "step_0000041"


def test_row16_after_a_stop_the_scripts_after_loop_work_is_skipped(repo, env, tmp_path):
    run_ = Started(lm(repo / LM), tmp_path, fp16(env))
    run_.wait_until(lambda: log_lines(run_.output), "the first log line")
    os.kill(run_.proc.pid, signal.SIGTERM)
    assert run_.finish(timeout=120) == 0, run_.output
    stopped_at(run_.output, tmp_path / "out")
    after = run_.output[STOPPED.search(run_.output).end():]
    assert "perplexity" not in after, "an evaluation ran after the stop"
    out = tmp_path / "out"
    assert not any((out / f).exists() for f in ("all_results.json", "model.safetensors", "config.json"))


# ------------------------------------------------------------------------------------------ row 11: its own trackers


def test_row11_its_own_init_trackers_is_said_once_and_no_record_is_logged_twice(finished_lm):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    said = [ln for ln in finished_lm.output.splitlines() if "accelerator.init_trackers: the trackers run already" in ln]
    assert len(said) == 1, finished_lm.output
    out = finished_lm.cwd / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "perplexity"):
        steps = [r["step"] for r in records if key in r]
        assert steps and len(steps) == len(set(steps)), f"{key} logged twice: {steps}"
    scalars: dict[str, list[int]] = {}
    for events in (out / "clm_no_trainer").rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if not value.tag.startswith("_hparams_"):
                    scalars.setdefault(value.tag, []).append(event.step)
    assert scalars.get("train/loss") == [10, 20, 30, 40] and len(scalars["perplexity"]) == 3, scalars


# ------------------------------------------------------------------------------------------ rows 13, 14: its old files


def test_row13_14_its_old_save_state_folder_resumes_by_its_flag_and_its_notes_stay(finished_lm, env, repo, tmp_path):
    """What the script wrote before the core came (``accelerator.save_state`` to ``out/step_20``: Accelerate's layout,
    without the session's meta.json and state) resumes through ``--resume_from_checkpoint`` with a notice; the run
    there moves aside only the session's own files, never the user's ``notes.txt``."""
    shutil.copytree(finished_lm.cwd / "out", tmp_path / "out")
    out = tmp_path / "out"
    plain = out / "step_20"
    shutil.copytree(out / "checkpoints" / "step_0000020", plain)
    for f in [plain / "meta.json", *plain.glob("amp_state_*.pt")]:
        f.unlink()
    (out / "notes.txt").write_text("lr 5e-4 looked best\n")
    p = run(lm(repo / LM, "--resume_from_checkpoint", "out/step_20", "--max_train_steps", "10"), tmp_path, fp16(env))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "out/step_20 is a plain accelerator.save_state checkpoint (no meta.json): loaded as it is" in p.stdout
    assert "the checkpoint holds no training position: step, epoch and data start from 0" in p.stdout
    assert (out / "notes.txt").read_text() == "lr 5e-4 looked best\n" and plain.is_dir()
    [aside] = (out / "previous-runs").iterdir()
    assert {p.name for p in aside.iterdir()} == {"checkpoints", "metrics.jsonl", "amp_summary.json", "clm_no_trainer"}
    assert latest(out) == "step_0000010"


# ------------------------------------------------------------------------------------------ row 15: the launcher


def test_row15_sigterm_to_accelerate_launch_every_rank_saves_and_the_launcher_exits_143(repo, env, tmp_path):
    """What a scheduler sees: SIGTERM to the launcher's process group (the ranks have sessions of their own, so the
    launcher forwards it), the ranks agree on the stop at the next log tick and both save; Accelerate's launcher then
    exits 128 + 15 whatever its ranks did (docs/copying-the-core.md says how to read that)."""
    run_ = Started(launch(repo / GPT, 2, "--init_from=resume"), tmp_path, cpu_ranks(env, 2))
    run_.wait_until(lambda: log_lines(run_.output), "the first log line")
    ranks = child_pids(run_.proc.pid)
    assert len(ranks) == 2 and all(os.getpgid(r) != run_.proc.pid for r in ranks)
    sent = time.monotonic()
    os.killpg(run_.proc.pid, signal.SIGTERM)
    assert run_.finish(timeout=120) == 128 + signal.SIGTERM, run_.output
    assert time.monotonic() - sent < 30, "the ranks outlived the launcher's 30 s grace"
    assert all(gone(r) for r in ranks) and "forcefully exiting via" not in run_.output, run_.output
    saved = stopped_at(run_.output, tmp_path / "out")
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"amp_state_0.pt", "amp_state_1.pt"} <= set(meta["files"]), meta
    assert "guard_stop" not in meta and not (tmp_path / "out" / "amp_summary.json").exists()


# ------------------------------------------------------------------------------------------ the docs, as written


def docs_blocks(section: str, containing: str) -> list[str]:
    """The fenced code blocks of ``## section`` in docs/copying-the-core.md that contain ``containing``."""
    text = COPYING.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```[a-z]*\n(.*?)```", body, re.S) if containing in b]
    assert blocks, f"no code block with {containing!r} under ## {section}"
    return blocks


RUN_BY_TESTS = ("load_model(", "os.execv(")  # code blocks a test runs as written (row 7, the guard's fallback)


def test_the_docs_code_for_a_script_with_its_own_amp_is_in_its_scripts_as_written():
    """Every Python block of the section is either lines of gpt_prefetch.py or lm_no_trainer.py, verbatim, or code
    that a test here runs as written."""
    scripts = {name: {ln.strip() for ln in (LOOPS / name).read_text().splitlines()} for name in (GPT, LM)}
    text = COPYING.read_text(encoding="utf-8").split("\n## A script with its own AMP\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 6
    for block in blocks:
        if any(call in block for call in RUN_BY_TESTS):
            continue
        lines = [ln.strip() for ln in block.splitlines() if ln.strip() and ln.strip() != "..."]
        missing = {name: [ln for ln in lines if ln not in source] for name, source in scripts.items()}
        assert min(map(len, missing.values())) == 0, f"a docs block is in neither script as written: {missing}"


def test_the_docs_restart_in_the_guards_precision_runs_as_written(repo, env, tmp_path):
    """gpt_prefetch.py leaving its loop at a stop and ending with the docs' lines: the guard (an overflowing scale,
    fallback) stops it at step 5, it restarts itself in the precision the guard names, which resumes and finishes."""
    [restart] = docs_blocks("A script with its own AMP", "os.execv(")
    after_step = ("amp.after_step(loss, samples=gradient_accumulation_steps * batch_size, "
                  "tokens=tokens_per_iter // world_size)")
    script = patched(repo, tmp_path, GPT,
                     ("log_every=log_interval, ", 'log_every=log_interval, scaler={"init_scale": 1e38}, '
                                                  'guard={"action": "fallback", "max_consecutive_skips": 5}, '),
                     (f"    {after_step}\n", f"    if {after_step}:\n        break\n"),
                     ("\namp.close()\n", "\n" + restart))
    p = run(gpt(script, "--max_iters=9"), tmp_path, env)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"stopped by the AMP guard at step 5; state saved to \S+; it asks to continue in (\S+) from there",
                  p.stdout)
    assert m, p.stdout
    assert f"precision: requested {m.group(1)} -> {m.group(1)}" in p.stdout
    assert f"precision switch: fp16 -> {m.group(1)} at step 5" in p.stdout
    assert latest(tmp_path / "out") == "step_0000010"
