"""Gradient accumulation as Accelerate's examples/by_feature/gradient_accumulation.py writes it:
``gradient_accumulation_steps`` on the Accelerator, ``with accelerator.accumulate(model):`` around every micro-batch,
and ``optimizer.step()``/``lr_scheduler.step()``/``zero_grad()`` called on each one (Accelerate skips them until the
gradients sync).

    python grad_accum.py --mixed_precision fp16 --gradient_accumulation_steps 4
"""

import argparse

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from amp import AmpSession


def main():
    parser = argparse.ArgumentParser(description="gradient accumulation")
    parser.add_argument("--mixed_precision", type=str, default=None)
    parser.add_argument("--output_dir", type=str, default="runs/grad_accum")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint_every", type=int, default=5)
    args = parser.parse_args()

    amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=args.checkpoint_every,
                     gradient_accumulation_steps=args.gradient_accumulation_steps)
    accelerator = amp.accelerator
    torch.manual_seed(3)
    features = torch.randn(640, 20)
    labels = (features[:, 0] * features[:, 1] > 0).long()
    rows = [{"features": f, "labels": label} for f, label in zip(features, labels, strict=True)]
    train_loader = DataLoader(rows, batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    lr_scheduler = LambdaLR(optimizer, lambda step: max(0.1, 1 - step / 200))
    model, optimizer, train_loader, lr_scheduler = amp.prepare(model, optimizer, train_loader, lr_scheduler)
    amp.resume("auto")

    for epoch in amp.epochs(args.epochs):
        model.train()
        for batch in amp.batches(train_loader):
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(batch["features"]), batch["labels"])
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            amp.after_step(loss)  # every micro-batch: the session counts the optimizer steps
        accelerator.print(f"epoch {epoch}: step {amp.step}")
    amp.close()


if __name__ == "__main__":
    main()
