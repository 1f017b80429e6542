"""The project's own config parser against tyro and jsonargparse, on what a user sees: one bad key, one bad type,
the time to that error, the import time, and whether --help shows each key's type, default and comment.

    python -m venv /tmp/libs && /tmp/libs/bin/pip install tyro "jsonargparse[signatures]" pyyaml
    python benchmarks/config_parsers/run.py --lib-python /tmp/libs/bin/python

Each parser reads the config tree of a project rendered into a temporary folder (amptpl must be installed here):
the project's own parser, and tyro and jsonargparse given the same dataclasses (the libraries' Python needs
pyyaml too). Wall times are medians
of 5 runs after a warm-up, interpreter start included. A library that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HAND = """import sys
from proj.config import ConfigError, ConfigExit, parse_args
try:
    cfg = parse_args(sys.argv[1:])
except ConfigExit as e:
    print(e.text); sys.exit(0)
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr); sys.exit(2)
print("ok")
"""


def wall(cmd: list[str], env: dict, n: int = 5) -> float:
    subprocess.run(cmd, capture_output=True, env=env, cwd=HERE)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, cwd=HERE)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def import_ms(python: str, module: str, env: dict) -> float:
    err = subprocess.run([python, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True,
                         env=env).stderr
    rows = [line.split("|") for line in err.splitlines() if line.rstrip().endswith(f"| {module}")]
    return int(rows[-1][1]) / 1000 if rows else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib-python", default=sys.executable, help="a Python with tyro and jsonargparse installed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "amptpl", "new", "proj", "--dir", tmp], check=True, capture_output=True)
        (Path(tmp) / "hand.py").write_text(HAND)
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "proj" / "src")}
        parsers = [("project (key=value)", sys.executable, [str(Path(tmp) / "hand.py")], "proj.config",
                    ["amp.scaler.init_scal=1024"], ["train.max_steps=abc"]),
                   ("tyro", args.lib_python, ["with_tyro.py"], "tyro", ["--amp.scaler.init-scal", "1024"],
                    ["--train.max-steps", "abc"]),
                   ("jsonargparse", args.lib_python, ["with_jsonargparse.py"], "jsonargparse",
                    ["--amp.scaler.init_scael", "1024"], ["--train.max_steps", "abc"])]
        for name, python, script, module, bad_key, bad_type in parsers:
            if subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True).returncode:
                print(f"== {name}: not installed for {python}, skipped")
                continue
            print(f"== {name}: import {import_ms(python, module, env):.1f} ms; a bad key answered in "
                  f"{wall([python, *script, *bad_key], env):.0f} ms")
            for label, argv in (("bad key", bad_key), ("bad type", bad_type)):
                p = subprocess.run([python, *script, *argv], capture_output=True, text=True, env=env, cwd=HERE)
                lines = (p.stdout + p.stderr).strip().splitlines()
                print(f"-- {label} {' '.join(argv)}: exit {p.returncode}, {len(lines)} lines")
                shown = lines if len(lines) <= 12 else [*lines[:6], f"... ({len(lines) - 9} more)", *lines[-3:]]
                print("\n".join(shown))
            p = subprocess.run([python, *script, "--help"], capture_output=True, text=True, env=env, cwd=HERE)
            comment = "2**16, PyTorch's default" in p.stdout
            print(f"-- --help: {len(p.stdout.splitlines())} lines; shows a field's comment: {comment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
