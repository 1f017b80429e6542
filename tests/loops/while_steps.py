"""A step-budget loop, as nanoGPT-style scripts write it: ``while step < max_steps``, epochs only as a way to get
more batches, leaving the data in the middle of an epoch when the budget is spent, and never a look at what the
session's calls return.

    python while_steps.py --mixed_precision fp16 --max_steps 90
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from amp import AmpSession


def main():
    parser = argparse.ArgumentParser(description="a step-budget loop")
    parser.add_argument("--mixed_precision", type=str, default=None)
    parser.add_argument("--output_dir", type=str, default="runs/while_steps")
    parser.add_argument("--max_steps", type=int, default=90)  # 40 batches an epoch: ends inside the third epoch
    parser.add_argument("--checkpoint_every", type=int, default=10)
    args = parser.parse_args()

    amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=args.checkpoint_every,
                     max_steps=args.max_steps)
    accelerator = amp.accelerator
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(640, 24, generator=g)
    y = (x[:, :12].sum(1) > x[:, 12:].sum(1)).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True)
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model, optimizer, loader = amp.prepare(model, optimizer, loader)
    amp.resume("auto")

    model.train()
    while amp.step < args.max_steps:
        for xb, yb in amp.batches(loader):
            loss = F.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            amp.after_step(loss, grad_norm)  # never looked at: after a stop, the next amp.batches ends the process
    if not amp.stop:
        accelerator.print(f"done at step {amp.step}")
    amp.close()


if __name__ == "__main__":
    main()
