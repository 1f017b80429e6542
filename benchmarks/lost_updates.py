"""Updates lost to bf16 rounding: pure bf16 AdamW against bf16-true's float32 master weights, and fp32.

    python benchmarks/lost_updates.py             # the default example's model, 60 steps at lr 1e-4 (about 1 min)
    python benchmarks/lost_updates.py --lr 2e-3   # the template's own peak learning rate

Three copies of the default example's model, built from one seed, train on the same batches in one process:

    fp32       float32 weights and AdamW state (the reference)
    pure bf16  the model and AdamW (so its state too) in bf16, no autocast: what ``model.to(torch.bfloat16)`` gives
    bf16-true  the model in bf16, AdamW on float32 master weights (``amp/master.py``), the model rounded from them

For each bf16 copy and each step it counts the *lost updates*: weight elements that AdamW moved (its first moment
is non-zero there) but whose stored value did not change. For pure bf16 the stored value is the weight itself,
so a lost update is gone for good; for bf16-true the stored value is the float32 master, and the bf16 copy that
did not change yet keeps the update in its master until it shows. It reports the share lost, the weights'
distance from fp32's, and the training loss over the last 10 steps. The last line is machine-readable:

    RESULT pure_bf16_lost_frac=<x> bf16_true_lost_frac=<x> pure_bf16_loss_rel=<loss / fp32>
           bf16_true_loss_rel=<x>

It prints numbers and never fails: there is no threshold to pass.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from dataclasses import replace

from _common import TEMPLATE_SRC, cpu_line, table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW's learning rate, constant (default 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be >= 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(TEMPLATE_SRC))
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from project import example
    from project.amp import precision
    from project.amp.hooks import Hooks
    from project.config import parse_args as config

    cfg = config([f"seed={args.seed}", "train.weight_decay=0"])
    print(f"torch {torch.__version__}, python {platform.python_version()}, torch threads {torch.get_num_threads()}")
    print(cpu_line())
    set_seed(cfg.seed)
    accelerator = Accelerator(cpu=True)
    loader, _, about = example.build_data(cfg, accelerator)
    print(f"the default example's model ({cfg.model}), {about}; AdamW lr {args.lr:g} constant, no weight decay, "
          f"{args.steps} steps\n")
    set_seed(cfg.seed)
    ref = example.build_model(cfg)
    nets = {"fp32": ref, "pure bf16": copy.deepcopy(ref).to(torch.bfloat16), "bf16-true": copy.deepcopy(ref)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0) for k, m in nets.items()}
    # bf16 weights with float32 masters in the optimizer: the core's own feature, through its hooks (amp/master.py)
    settings = replace(cfg.amp, precision="bf16-true", audit="off", meters=False)
    hooks = Hooks(accelerator, settings, precision.resolve("bf16-true", "cpu"), print)
    hooks.before_prepare([nets["bf16-true"]], [opts["bf16-true"]])
    master = hooks.get("master")
    stored = {"pure bf16": lambda: list(nets["pure bf16"].parameters()), "bf16-true": lambda: [m for _, m in master.pairs]}
    lost: dict[str, list[float]] = {k: [] for k in stored}
    shown: list[float] = []  # bf16-true: share of the moved elements whose bf16 copy changed this step
    losses: dict[str, list[float]] = {k: [] for k in nets}
    batches = iter(loader)
    for _ in range(args.steps):
        batch = next(batches)
        before = {k: [t.detach().clone() for t in f()] for k, f in stored.items()}
        low_before = [p.detach().clone() for p, _ in master.pairs]
        for name, net in nets.items():
            loss = example.loss(net, batch)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            losses[name].append(loss.item())
        for name, f in stored.items():
            opt = opts[name]
            moved = changed = 0
            for t, b in zip(f(), before[name], strict=True):
                m = opt.state[t]["exp_avg"] != 0
                moved += int(m.sum())
                changed += int((m & (t.detach() != b)).sum())
            lost[name].append(1 - changed / max(moved, 1))
        total = sum(p.numel() for p, _ in master.pairs)
        shown.append(sum(int((p.detach() != b).sum()) for (p, _), b in zip(master.pairs, low_before, strict=True)) / total)

    def distance(name: str) -> float:
        """RMS of the weights' difference from fp32's, relative to fp32's RMS."""
        a = torch.cat([p.detach().float().flatten() for p in ref.parameters()])
        b = torch.cat([p.detach().float().flatten() for p in (nets[name].parameters() if name != "bf16-true"
                                                               else (m for _, m in master.pairs))])
        return float((a - b).norm() / a.norm())

    tail = {k: statistics.mean(v[-10:]) for k, v in losses.items()}
    rows = [["fp32", "-", "-", f"{tail['fp32']:.4f}", "1.0000"]]
    for name in stored:
        rows.append([name, f"{100 * statistics.mean(lost[name]):.1f}%", f"{distance(name):.2e}", f"{tail[name]:.4f}",
                     f"{tail[name] / tail['fp32']:.4f}"])
    print(table(["weights", "updates lost per step", "distance from fp32", "loss, last 10 steps", "loss / fp32"], rows))
    print(f"\nbf16-true: {100 * statistics.mean(shown):.1f}% of the weights' bf16 copies changed per step; the rest of "
          "each update waits in the float32 master (counted above: the masters lose none)")
    print(f"\nRESULT pure_bf16_lost_frac={statistics.mean(lost['pure bf16']):.4f} "
          f"bf16_true_lost_frac={statistics.mean(lost['bf16-true']):.4f} "
          f"pure_bf16_loss_rel={tail['pure bf16'] / tail['fp32']:.4f} "
          f"bf16_true_loss_rel={tail['bf16-true'] / tail['fp32']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
