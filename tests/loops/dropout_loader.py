"""An Accelerate script as most are written: a DataLoader with ``shuffle=True`` and no ``generator=``, a model with
dropout, epochs over the loader, an eval after each epoch.

    python dropout_loader.py --mixed_precision fp16
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from amp import AmpSession


def main():
    parser = argparse.ArgumentParser(description="dropout and a plain DataLoader")
    parser.add_argument("--mixed_precision", type=str, default=None)
    parser.add_argument("--output_dir", type=str, default="runs/dropout_loader")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args()

    amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=args.checkpoint_every)
    accelerator = amp.accelerator
    torch.manual_seed(42)
    x = torch.randn(768, 32)
    y = (x @ torch.randn(32) > 0).long()
    train_loader = DataLoader(TensorDataset(x[:640], y[:640]), batch_size=16, shuffle=True,
                              num_workers=args.num_workers)
    eval_loader = DataLoader(TensorDataset(x[640:], y[640:]), batch_size=64)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(128, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, train_loader, eval_loader = amp.prepare(model, optimizer, train_loader, eval_loader)
    amp.resume("auto")

    for epoch in amp.epochs(args.epochs):
        model.train()
        for xb, yb in amp.batches(train_loader):
            loss = F.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            amp.after_step(loss)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for xb, yb in eval_loader:
                pred, ref = accelerator.gather_for_metrics((model(xb).argmax(-1), yb))
                correct += (pred == ref).sum().item()
                total += ref.numel()
        accelerator.print(f"epoch {epoch}: accuracy {correct / total:.3f}")
    amp.close()


if __name__ == "__main__":
    main()
