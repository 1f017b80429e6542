"""Dict batches as Hugging Face ``datasets`` give them: a ``Dataset`` tokenized with ``map``, ``set_format("torch")``,
a DataLoader over it, and a model called with ``**batch``-style keys.

    python hf_dataset.py --mixed_precision fp16
"""

import argparse

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader

from amp import AmpSession

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "film", "book", "was", "is", "very", "not"]


class BagOfWords(torch.nn.Module):
    def __init__(self, vocab, dim=32):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocab, dim, mode="mean")
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(dim, 2)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.drop(self.embed(input_ids)))
        return logits, (F.cross_entropy(logits.float(), labels) if labels is not None else None)


def main():
    parser = argparse.ArgumentParser(description="dict batches from datasets")
    parser.add_argument("--mixed_precision", type=str, default=None)
    parser.add_argument("--output_dir", type=str, default="runs/hf_dataset")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    args = parser.parse_args()

    amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=args.checkpoint_every)
    accelerator = amp.accelerator
    g = torch.Generator().manual_seed(7)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=g).tolist()) for _ in range(640)]
    labels = [int(sum(t.split().count(w) for w in WORDS[:3]) >= sum(t.split().count(w) for w in WORDS[3:6]))
              for t in texts]
    ds = Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda row: {"input_ids": [WORDS.index(w) for w in row["text"].split()]}, remove_columns=["text"])
    ds = ds.rename_column("label", "labels")
    ds.set_format("torch")
    loader = DataLoader(ds, batch_size=16, shuffle=True)
    torch.manual_seed(0)
    model = BagOfWords(len(WORDS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model, optimizer, loader = amp.prepare(model, optimizer, loader)
    amp.resume("auto")

    for epoch in amp.epochs(args.epochs):
        model.train()
        for batch in amp.batches(loader):
            _, loss = model(**batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            amp.after_step(loss)
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")
    amp.close()


if __name__ == "__main__":
    main()
