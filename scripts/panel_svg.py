"""Draw the live panel of a real run as an SVG (rich's own export): the picture in the README and the docs.

    python scripts/panel_svg.py                    # trains configs/demo.yaml, writes docs/panel.svg (~1 min, 2 cores)
    python scripts/panel_svg.py --steps 40 --out /tmp/panel.svg

It trains the template's demo configuration (fp16 with a real CPU GradScaler on a small model, starting at a
loss scale that overflows) in this process, offline, and draws the panel the run showed last, from the run's
own final status, with the console's own ``render``: nothing in the picture is typed by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of the demo run (default 150)")
    p.add_argument("--out", default=str(REPO / "docs" / "panel.svg"), help="the SVG to write")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import template_src

    sys.path.insert(0, str(template_src()))  # the template's package with the default example, as ``project``

    from project.amp import console as console_mod
    from project.train import main as train
    from rich.console import Console

    seen = []
    exit_ = console_mod.TrainConsole.__exit__

    def keep_last_status(self, *exc):  # the run's own final status, as its panel showed it
        seen.append(self.status)
        return exit_(self, *exc)

    console_mod.TrainConsole.__exit__ = keep_last_status
    with tempfile.TemporaryDirectory(prefix="panel-") as out_dir:
        demo = REPO / "template" / "examples" / "bytelm" / "configs" / "demo.yaml"
        code = train(["--config", str(demo), f"train.max_steps={args.steps}",
                      f"out_dir={out_dir}", "amp.live=false", "amp.checkpoint_every=0", "amp.auto.measure=false"])
    if code != 0 or not seen:
        print(f"error: the demo run ended with exit code {code}", file=sys.stderr)
        return 1
    picture = Console(record=True, width=100, force_terminal=True, color_system="truecolor", file=open(os.devnull, "w"))
    picture.print(console_mod.render(seen[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save_svg(args.out, title="python -m myproj.train --config configs/demo.yaml")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
