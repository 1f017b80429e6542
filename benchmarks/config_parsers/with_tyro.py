"""Config via tyro: --config FILE.yaml becomes the default instance, then --a.b.c VALUE overrides it."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro
import yaml
from proj.config import Config  # the rendered project's own tree (run.py puts it on the path)


@dataclass
class Cli:
    """Train with the config below. Precedence: defaults < --config FILE.yaml < --key value."""

    config: str | None = None  # a YAML file of keys, applied before the command-line flags
    print_config: bool = False  # print the resolved config as YAML (usable as --config) and exit
    cfg: Annotated[Config, tyro.conf.arg(name="")] = field(default_factory=Config)


def merge(obj, data: dict):
    """YAML dict -> dataclass instance, recursively (tyro has no file loader; an unknown key raises TypeError)."""
    kw = {}
    for k, v in data.items():
        cur = getattr(obj, k, None)
        kw[k] = merge(cur, v) if dataclasses.is_dataclass(cur) and isinstance(v, dict) else v
    return dataclasses.replace(obj, **kw)


def parse(argv: list[str]) -> Config:
    path = None  # first pass: only --config, so its values become tyro's defaults
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    cfg = Config()
    if path:
        with open(path) as f:
            cfg = merge(cfg, yaml.safe_load(f) or {})
    cli = tyro.cli(Cli, default=Cli(config=path, cfg=cfg), args=argv)
    if cli.print_config:
        print(yaml.safe_dump(dataclasses.asdict(cli.cfg), sort_keys=False, default_flow_style=None), end="")
        sys.exit(0)
    return cli.cfg


if __name__ == "__main__":
    c = parse(sys.argv[1:])
    print("ok", c.amp.scaler.init_scale, c.train.max_steps)
