"""Making the template yours: the example swapped for a user's own (an MLP on synthetic blobs, tests/swap/) as the
README's "Make it yours" says, touching only the example's part; the project's config tests, a training with a resume
and the sample command then pass. The AMP core's own tests (tests/core) use fixtures of their own, so a swap cannot
touch them: they run once, in the default project (test_e2e.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import render

SWAP = Path(__file__).parent / "swap"


@pytest.mark.slow
def test_swapping_the_example_keeps_the_config_and_the_loop_working_through_a_training_and_a_resume(tmp_path, env):
    project = render(tmp_path, "swapped")
    before = {p.relative_to(project) for p in project.rglob("*") if p.is_file()}
    # the documented swap: the example package, its demo preset, its tests; nothing else
    shutil.rmtree(project / "src/swapped/example")
    shutil.copytree(SWAP / "example", project / "src/swapped/example")
    shutil.copy(SWAP / "demo.yaml", project / "configs/demo.yaml")
    for test in (project / "tests").glob("test_example_*.py"):
        test.unlink()
    after = {p.relative_to(project) for p in project.rglob("*") if p.is_file()}
    touched = {str(p) for p in before ^ after} | {"configs/demo.yaml", "README.md"}
    assert all(t.startswith(("src/swapped/example/", "tests/test_example_", "configs/demo.yaml", "README.md"))
               for t in touched)

    run_env = {**env, "PYTHONPATH": str(project / "src")}
    # the README's key table, made again from config.py (a core test checks it)
    r = subprocess.run([sys.executable, "-m", "swapped.config", "--write", "README.md"], cwd=project, env=run_env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "| `data.num_samples` |" in (project / "README.md").read_text(), r.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
                       cwd=project, env=run_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]

    out = tmp_path / "run"
    base = [sys.executable, "-m", "swapped.train", "data.num_samples=256", "train.batch_size=16", "amp.log_every=2",
            "amp.live=false", "eval.batches=2", "amp.checkpoint_every=2", "amp.precision=fp16", f"out_dir={out}"]
    r = subprocess.run([*base, "train.max_steps=4"], cwd=project, env=run_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "val/accuracy" in r.stdout and f"model: {out / 'final'}" in r.stdout
    r = subprocess.run([*base, "train.max_steps=6"], cwd=project, env=run_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resume: loaded {out / 'checkpoints' / 'step_0000004'}" in r.stdout and "step 6/6 | loss" in r.stdout
    r = subprocess.run([sys.executable, "-m", "swapped.sample", str(out)], cwd=project, env=run_env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("predicted"), r.stdout + r.stderr
