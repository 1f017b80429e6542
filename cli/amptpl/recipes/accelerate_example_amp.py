"""A training script on Accelerate, shaped like Accelerate's examples/nlp_example.py.

A two-layer MLP learns a synthetic two-class problem, so it runs offline on a CPU in seconds:

    python train.py                                   # one process, CPU or GPU
    python train.py --mixed_precision fp16            # or bf16
    accelerate launch --num_processes 2 train.py      # several processes
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

try:
    from .amp import AmpSession
except ImportError:
    from amp import AmpSession
EVAL_BATCH_SIZE = 64
NUM_FEATURES = 16
NUM_CLASSES = 2


def get_dataloaders(accelerator: Accelerator, batch_size: int = 16):
    """Train and eval dataloaders over a fixed synthetic dataset: 512 + 128 rows of 16 features.

    The label is the side of a random hyperplane a row falls on. The data comes from its own generator, so
    it is the same in every run and on every process, whatever the training seed.
    """
    g = torch.Generator().manual_seed(1234)
    features = torch.randn(512 + 128, NUM_FEATURES, generator=g)
    labels = (features @ torch.randn(NUM_FEATURES, generator=g) > 0).long()
    rows = [{"features": x, "labels": y} for x, y in zip(features, labels, strict=True)]
    train_dataloader = DataLoader(rows[:512], shuffle=True, batch_size=batch_size, drop_last=True)
    eval_dataloader = DataLoader(rows[512:], shuffle=False, batch_size=EVAL_BATCH_SIZE)
    return train_dataloader, eval_dataloader


def training_function(config, args):
    # Initialize accelerator
    amp = AmpSession(args.mixed_precision, "runs/example", checkpoint_every=20, cpu=args.cpu)
    accelerator = amp.accelerator
    # Sample hyper-parameters for learning rate, batch size, seed and a few other HPs
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])
    warmup_steps = int(config["warmup_steps"])

    set_seed(seed)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    # Instantiate the model (we build the model here so that the seed also controls new weights initialization)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, NUM_CLASSES),
    )
    optimizer = AdamW(params=model.parameters(), lr=lr)

    # Linear warmup, then linear decay to zero at the last step
    total_steps = len(train_dataloader) * num_epochs

    def warmup_then_decay(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    lr_scheduler = LambdaLR(optimizer, warmup_then_decay)

    # Prepare everything
    # There is no specific order to remember, we just need to unpack the objects in the same order we gave them to the
    # prepare method.
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = amp.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    amp.resume("auto")

    # Now we train the model
    for epoch in amp.epochs(num_epochs):
        model.train()
        for step, batch in enumerate(amp.batches(train_dataloader)):
            outputs = model(batch["features"])
            loss = F.cross_entropy(outputs, batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            amp.after_step(loss)
            if step % 10 == 0:
                accelerator.print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")

        model.eval()
        correct, total = 0, 0
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(batch["features"])
            predictions = outputs.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += (predictions == references).sum().item()
            total += references.numel()

        # Use accelerator.print to print only on the main process.
        accelerator.print(f"epoch {epoch}:", {"accuracy": correct / total})
    amp.close()


def main():
    parser = argparse.ArgumentParser(description="Simple example of training script.")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16", "fp8"],
        help="Whether to use mixed precision. Choose between fp16 and bf16 (bfloat16).",
    )
    parser.add_argument("--cpu", action="store_true", help="If passed, will train on the CPU.")
    args = parser.parse_args()
    config = {"lr": 1e-3, "num_epochs": 2, "seed": 42, "batch_size": 16, "warmup_steps": 8}
    training_function(config, args)


if __name__ == "__main__":
    main()
