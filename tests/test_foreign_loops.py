"""The AMP core in loops it did not write: one table of real training scripts, each run the way its users run it.

Every script in ``tests/loops/`` is a common loop shape with the AMP core added by hand, as a user would after
``amptpl add``: a word-level language model over manual tensor slices (no DataLoader, script state, whole-model
``torch.save``), a ``while step < max_steps`` loop that breaks inside an epoch, a DataLoader without ``generator=``
and a model with dropout, gradient accumulation with ``accelerator.accumulate``, and dict batches from ``datasets``.
(The ``nlp_example.py`` shape is the printed recipe: ``test_recipe.py``.) For each row: fp16 on a CPU shows the loss
scale and saves the scaler; SIGKILL after a checkpoint, then the same command, ends bitwise equal to an uninterrupted
run. Where the shape changes how a stop ends the loop or how two processes share it: SIGTERM saves and exits 0, and
two gloo ranks train, are killed, and resume. Then what each shape adds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _runs import Started, assert_same_weights, cpu_ranks, latest, launch, log_lines, sealed, world_size

LOOPS = Path(__file__).parent / "loops"
COPYING = Path(__file__).resolve().parents[1] / "docs" / "copying-the-core.md"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks through /proc")]


@dataclass(frozen=True)
class Loop:
    script: str  # tests/loops/SCRIPT.py
    heading: str  # its paragraph in docs/copying-the-core.md


ROWS = [
    Loop("word_lm", "A loop over slices of one tensor (no DataLoader)"),
    Loop("while_steps", "A step budget that breaks inside an epoch"),
    Loop("dropout_loader", "A DataLoader without generator= and a model with dropout"),
    Loop("grad_accum", "Gradient accumulation"),
    Loop("hf_dataset", "Dict batches from datasets"),
]
IDS = [row.script for row in ROWS]
# where a shape changes how a stop ends the loop, or how two processes split and sync it; the other shapes stop
# and run on two processes as these do (a DataLoader of tensors or of dicts, with or without dropout)
SHAPED = [row for row in ROWS if row.script in ("word_lm", "while_steps", "grad_accum")]
TWO = [row for row in ROWS if row.script in ("word_lm", "grad_accum")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A user's repository: the loop scripts, and the AMP core copied next to them by ``amptpl add``."""
    root = tmp_path_factory.mktemp("repo")
    p = subprocess.run([sys.executable, "-m", "amptpl", "add", str(root)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    for script in LOOPS.glob("*.py"):
        (root / script.name).write_text(script.read_text())
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Offline, unbuffered, no accelerate config or launcher settings of the user's."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k != "PYTHONPATH"}
    e.update(HF_HOME=str(tmp_path_factory.mktemp("hf-home")), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200")
    return e


def run(script: Path, cwd: Path, env: dict[str, str], nproc: int = 1, *args: str,
        precision: str = "fp16") -> subprocess.CompletedProcess:
    return subprocess.run(launch(script, nproc, "--mixed_precision", precision, "--output_dir", "out", *args),
                          cwd=cwd, env=cpu_ranks(env, nproc), capture_output=True, text=True, timeout=600, check=False)


def start(script: Path, cwd: Path, env: dict[str, str], nproc: int = 1, *args: str, precision: str = "fp16") -> Started:
    return Started(launch(script, nproc, "--mixed_precision", precision, "--output_dir", "out", *args), cwd,
                   cpu_ranks(env, nproc))


@dataclass
class Done:
    cwd: Path
    output: str


@pytest.fixture(scope="module")
def straight(repo, env, tmp_path_factory):
    """The uninterrupted fp16 run of each script on one process, made once."""
    done: dict[str, Done] = {}

    def get(script: str) -> Done:
        if script not in done:
            cwd = tmp_path_factory.mktemp(f"straight-{script}")
            p = run(repo / f"{script}.py", cwd, env)
            assert p.returncode == 0, p.stdout + p.stderr
            done[script] = Done(cwd, p.stdout)
        return done[script]

    return get


# ------------------------------------------------------------------------------------------ every row


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_fp16_on_a_cpu_shows_the_loss_scale_and_saves_the_scaler(row, straight):
    done = straight(row.script)
    assert re.search(r"^precision: requested fp16 -> fp16\b", done.output, re.M), done.output
    ticks = log_lines(done.output)
    assert ticks and all(re.search(r"\| scale \d", t) for t in ticks), done.output
    saved = sorted((done.cwd / "out" / "checkpoints").glob("step_*"))
    assert saved and all((c / "scaler.pt").is_file() for c in saved)
    summary = json.loads((done.cwd / "out" / "amp_summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["amp/scale"] > 0


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_sigkill_after_a_checkpoint_then_the_same_command_ends_bitwise_equal(row, repo, env, straight, tmp_path):
    ref = straight(row.script)
    final = latest(ref.cwd / "out")
    run_ = start(repo / f"{row.script}.py", tmp_path, env)
    run_.wait_until((tmp_path / "out" / "checkpoints" / "latest").exists, "the first checkpoint")
    run_.kill_everything(1)
    killed_at = sealed(tmp_path / "out")
    assert killed_at < final, "the kill came after the run had finished: nothing was tested"
    resumed = run(repo / f"{row.script}.py", tmp_path, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume: loaded {Path('out', 'checkpoints', killed_at)}" in resumed.stdout, resumed.stdout
    assert latest(tmp_path / "out") == final
    assert_same_weights(ref.cwd / "out" / "checkpoints" / final, tmp_path / "out" / "checkpoints" / final)


@pytest.mark.parametrize("row", SHAPED, ids=[r.script for r in SHAPED])
def test_sigterm_saves_a_complete_checkpoint_and_exits_0(row, repo, env, tmp_path):
    run_ = start(repo / f"{row.script}.py", tmp_path, env)
    run_.wait_until(lambda: log_lines(run_.output), "the first log line")
    os.kill(run_.proc.pid, signal.SIGTERM)
    assert run_.finish() == 0, run_.output
    m = re.search(r"stopped by SIGTERM at step (\d+); state saved to (\S+)", run_.output)
    assert m, run_.output
    saved = tmp_path / "out" / "checkpoints" / f"step_{int(m.group(1)):07d}"
    assert latest(tmp_path / "out") == saved.name
    assert json.loads((saved / "meta.json").read_text())["complete"] is True
    assert "(amp.resume continues from it)" in run_.output


@pytest.mark.parametrize("row", TWO, ids=[r.script for r in TWO])
def test_two_gloo_ranks_train_are_killed_and_resume(row, repo, env, tmp_path):
    script = repo / f"{row.script}.py"
    run_ = start(script, tmp_path, env, 2)
    run_.wait_until((tmp_path / "out" / "checkpoints" / "latest").exists, "the first checkpoint", timeout=600)
    assert len(run_.kill_everything(2)) == 2
    killed_at = sealed(tmp_path / "out")
    resumed = run(script, tmp_path, env, 2)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert world_size(resumed.stdout) == 2, out
    assert f"resume: loaded {Path('out', 'checkpoints', killed_at)}" in resumed.stdout, out
    assert latest(tmp_path / "out") > killed_at and (tmp_path / "out" / "amp_summary.json").is_file()
    assert "same first batch" not in out  # every shape here splits its data between the processes


def test_bf16_true_in_a_users_loop_resumes_bitwise_and_trains_on_two_gloo_ranks(repo, env, tmp_path):
    """bf16 weights with float32 masters in a loop the core did not write: float inputs from a plain DataLoader,
    dropout, ``optimizer.zero_grad()``; killed after a checkpoint, the same command ends bitwise equal; DDP
    all-reduces the bf16 gradients over gloo."""
    script = repo / "dropout_loader.py"
    for name in ("straight", "killed", "two"):
        (tmp_path / name).mkdir()
    ref = run(script, tmp_path / "straight", env, precision="bf16-true")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert re.search(r"^precision: requested bf16-true -> bf16-true \(as requested: bf16 weights", ref.stdout, re.M)
    final = latest(tmp_path / "straight" / "out")
    run_ = start(script, tmp_path / "killed", env, precision="bf16-true")
    run_.wait_until((tmp_path / "killed" / "out" / "checkpoints" / "latest").exists, "the first checkpoint")
    run_.kill_everything(1)
    assert latest(tmp_path / "killed" / "out") < final, "the kill came after the run had finished"
    resumed = run(script, tmp_path / "killed", env, precision="bf16-true")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_weights(tmp_path / "straight" / "out" / "checkpoints" / final,
                        tmp_path / "killed" / "out" / "checkpoints" / final)
    two = run(script, tmp_path / "two", env, 2, precision="bf16-true")
    assert two.returncode == 0 and world_size(two.stdout) == 2, two.stdout + two.stderr
    assert json.loads((tmp_path / "two" / "out" / "amp_summary.json").read_text())["precision"] == "bf16-true"


def test_each_loop_shape_has_a_docs_paragraph_whose_session_calls_its_script_makes():
    section = COPYING.read_text(encoding="utf-8")
    for row in ROWS:
        m = re.search(rf"^\*\*{re.escape(row.heading)}\.\*\*(.*?)(?=\n\n|\Z)", section, re.S | re.M)
        assert m, f"no paragraph **{row.heading}.** in docs/copying-the-core.md"
        calls = [c for c in re.findall(r"`([^`]+)`", m.group(1)) if "amp." in c or "accelerator." in c]
        assert calls, f"the paragraph on {row.heading!r} names no call"
        source = (LOOPS / f"{row.script}.py").read_text()
        missing = [c for c in calls if c not in source]
        assert not missing, f"tests/loops/{row.script}.py does not make the docs' {missing}"


# ------------------------------------------------------------------------------------------ what each shape adds


def test_the_word_lm_keeps_its_script_state_and_reloads_its_whole_model_after_a_resume(repo, env, straight, tmp_path):
    """best_val_loss and the annealed lr come back through amp.track; torch.save(amp.unwrap(model)) of the prepared
    model pickles and loads as a plain module, also in the resumed process."""
    ref = straight("word_lm")
    run_ = start(repo / "word_lm.py", tmp_path, env)
    run_.wait_until(lambda: "end of epoch   1" in run_.output and "checkpoint:" in run_.output.split(
        "end of epoch   1", 1)[1], "a checkpoint in the second epoch")
    run_.kill_everything(1)
    resumed = run(repo / "word_lm.py", tmp_path, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    end = re.compile(r"^\| End of training .*$", re.M)
    assert end.search(resumed.stdout) and end.search(resumed.stdout).group() == end.search(ref.output).group()


def test_ctrl_c_ends_the_word_lm_training_and_its_own_test_run_still_happens(repo, env, tmp_path):
    run_ = start(repo / "word_lm.py", tmp_path, env)
    run_.wait_until(lambda: "end of epoch   1" in run_.output, "the first epoch")
    os.kill(run_.proc.pid, signal.SIGINT)
    assert run_.finish() == 0, run_.output
    assert "stopped by SIGINT" in run_.output and "| End of training |" in run_.output, run_.output


def _patched(repo: Path, tmp_path: Path, old: str, new: str) -> Path:
    script = tmp_path / "word_lm.py"
    text = (repo / "word_lm.py").read_text()
    assert old in text
    script.write_text(text.replace(old, new))
    (tmp_path / "amp").symlink_to(repo / "amp")
    return script


def test_two_ranks_on_the_same_data_are_told_so_at_the_first_log_tick(repo, env, tmp_path):
    script = _patched(repo, tmp_path, "train_data = train_data.chunk(", "_ = train_data.chunk(")
    p = run(script, tmp_path, env, 2, "--epochs", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    warnings = [ln for ln in p.stdout.splitlines() if "processes trained on the same first batch" in ln]
    assert len(warnings) == 1, p.stdout


def test_clipping_still_scaled_gradients_is_named_at_the_first_log_tick(repo, env, tmp_path):
    script = _patched(repo, tmp_path, "accelerator.clip_grad_norm_(model.parameters(), args.clip)",
                      "torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)")
    p = run(script, tmp_path, env, 1, "--epochs", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    warnings = [ln for ln in p.stdout.splitlines() if "made smaller while still scaled" in ln]
    assert len(warnings) == 1 and "accelerator.clip_grad_norm_" in warnings[0], p.stdout


@pytest.mark.parametrize(("old", "new", "says"), [
    ("        optimizer.step()\n", "        for param in model.parameters():\n"
     "            param.data.add_(param.grad, alpha=-state['lr'])\n", "the optimizer step did not go through the GradScaler"),
    ("        accelerator.backward(loss)\n", "        loss.backward()\n", "did not go through accelerator.backward(loss)"),
], ids=["manual-sgd", "loss.backward"])
def test_an_fp16_step_that_bypasses_the_scaler_is_one_line_at_the_first_step(old, new, says, repo, env, tmp_path):
    p = run(_patched(repo, tmp_path, old, new), tmp_path, env, 1, "--epochs", "1")
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "LoopError: fp16: " in last and says in last, p.stderr
    assert not log_lines(p.stdout), "it trained on before saying so"


def test_data_loader_workers_survive_a_sigterm_to_the_whole_process_group(repo, env, tmp_path):
    """A scheduler's preemption signals the process group: the workers ignore it, the run saves and exits 0."""
    run_ = start(repo / "dropout_loader.py", tmp_path, env, 1, "--num_workers", "2")
    run_.wait_until(lambda: log_lines(run_.output), "the first log line")
    os.killpg(run_.proc.pid, signal.SIGTERM)
    assert run_.finish() == 0, run_.output
    assert re.search(r"stopped by SIGTERM at step \d+; state saved to", run_.output), run_.output
