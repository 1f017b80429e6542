"""Config via jsonargparse: auto_cli adds --config FILE.yaml (then --a.b.c VALUE overrides) and --print_config."""
from __future__ import annotations

import sys

from jsonargparse import auto_cli, set_parsing_settings
from proj.config import Config  # the rendered project's own tree (run.py puts it on the path)

# jsonargparse reads field help from attribute docstrings (or an Args:/Attributes: docstring section), not from
# the trailing comments the project writes: its --help shows types and defaults only
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def parse(argv: list[str]) -> Config:
    return auto_cli(Config, args=argv)


if __name__ == "__main__":
    c = parse(sys.argv[1:])
    print("ok", c.amp.scaler.init_scale, c.train.max_steps)
