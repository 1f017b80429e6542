"""A word-level language model in the shape of PyTorch's examples/word_language_model/main.py, with the AMP core.

Module-level code; one long tensor cut by ``batchify`` and read by ``get_batch`` over a ``range`` of offsets (no
DataLoader); a Transformer with dropout; ``best_val_loss`` and the learning rate annealed by 4 kept as script state;
the best model saved whole with ``torch.save``; ``except KeyboardInterrupt`` around training, then a test run.
The corpus is a generated pseudo-language, so it runs offline in seconds.

    python word_lm.py --mixed_precision fp16
    accelerate launch --multi_gpu --num_processes 2 word_lm.py
"""

import argparse
import math
import os
import time

import torch
import torch.nn as nn
from accelerate.utils import DistributedDataParallelKwargs

from amp import AmpSession

parser = argparse.ArgumentParser(description="Transformer language model on a generated corpus")
parser.add_argument("--mixed_precision", type=str, default=None, help="fp32, bf16, fp16 or auto")
parser.add_argument("--output_dir", type=str, default="runs/word_lm", help="checkpoints and logs")
parser.add_argument("--checkpoint_every", type=int, default=10, help="optimizer steps between checkpoints")
parser.add_argument("--emsize", type=int, default=32, help="size of word embeddings")
parser.add_argument("--nhid", type=int, default=64, help="feed-forward size")
parser.add_argument("--nlayers", type=int, default=2, help="number of layers")
parser.add_argument("--lr", type=float, default=3e-3, help="initial learning rate")
parser.add_argument("--clip", type=float, default=0.25, help="gradient clipping")
parser.add_argument("--epochs", type=int, default=3, help="upper epoch limit")
parser.add_argument("--batch_size", type=int, default=8, metavar="N", help="batch size")
parser.add_argument("--bptt", type=int, default=16, help="sequence length")
parser.add_argument("--dropout", type=float, default=0.2, help="dropout applied to layers (0 = no dropout)")
parser.add_argument("--seed", type=int, default=1111, help="random seed")
parser.add_argument("--log-interval", type=int, default=20, metavar="N", help="report interval")
parser.add_argument("--save", type=str, default="model.pt", help="file name to save the final model")
args = parser.parse_args()

torch.manual_seed(args.seed)
# the positional-encoding buffer is a transposed view, which DDP cannot broadcast: Accelerate's handler passes through
ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
amp = AmpSession(args.mixed_precision, args.output_dir, checkpoint_every=args.checkpoint_every, kwargs_handlers=[ddp])
accelerator = amp.accelerator
device = accelerator.device

###############################################################################
# Load data
###############################################################################


def make_corpus(n_tokens, vocab, seed):
    """Word ids from a Markov chain: each word is followed by one of four words of its own."""
    g = torch.Generator().manual_seed(seed)
    follow = torch.randint(0, vocab, (vocab, 4), generator=g)
    choice = torch.randint(0, 4, (n_tokens,), generator=g)
    ids, word = [], 0
    for c in choice.tolist():
        ids.append(word)
        word = int(follow[word, c])
    return torch.tensor(ids)


ntokens = 200
corpus = make_corpus(7200, ntokens, seed=0)


def batchify(data, bsz):
    # Work out how cleanly we can divide the dataset into bsz parts, trim off the rest, lay it out in columns
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    data = data.view(bsz, -1).t().contiguous()
    return data.to(device)


eval_batch_size = 10
train_data = batchify(corpus[:6000], args.batch_size * accelerator.num_processes)
train_data = train_data.chunk(accelerator.num_processes, dim=1)[accelerator.process_index].contiguous()  # mine
val_data = batchify(corpus[6000:6600], eval_batch_size)
test_data = batchify(corpus[6600:], eval_batch_size)

###############################################################################
# Build the model
###############################################################################


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout=0.1, max_len=512):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0), :])


class TransformerModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.5):
        super().__init__()
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        layer = nn.TransformerEncoderLayer(ninp, 2, nhid, dropout)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)

    def forward(self, src):
        mask = nn.Transformer.generate_square_subsequent_mask(len(src), device=src.device)
        src = self.pos_encoder(self.encoder(src) * math.sqrt(self.ninp))
        return self.decoder(self.transformer_encoder(src, mask))


model = TransformerModel(ntokens, args.emsize, args.nhid, args.nlayers, args.dropout)
criterion = nn.NLLLoss()
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
model, optimizer = amp.prepare(model, optimizer)
state = amp.track({"best_val_loss": None, "lr": args.lr})  # script state that a resume must bring back
amp.resume("auto")

###############################################################################
# Training code
###############################################################################


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    data = source[i : i + seq_len]
    target = source[i + 1 : i + 1 + seq_len].view(-1)
    return data, target


def evaluate(data_source):
    model.eval()
    total_loss = 0.0
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i)
            output = model(data).view(-1, ntokens)
            total_loss += len(data) * criterion(torch.log_softmax(output.float(), -1), targets).item()
    return total_loss / (len(data_source) - 1)


def train(epoch):
    model.train()
    total_loss = 0.0
    start_time = time.time()
    for batch, i in enumerate(amp.batches(range(0, train_data.size(0) - 1, args.bptt))):
        data, targets = get_batch(train_data, i)
        optimizer.zero_grad()
        output = model(data).view(-1, ntokens)
        loss = criterion(torch.log_softmax(output.float(), -1), targets)
        accelerator.backward(loss)
        # unscales first under fp16: a clip of the still-scaled gradients would clip them scale times too hard
        accelerator.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        amp.after_step(loss, samples=data.size(1), tokens=data.numel())  # (T, B) batches: say what a sample is

        total_loss += loss.item()
        if batch % args.log_interval == 0 and batch > 0:
            cur_loss = total_loss / args.log_interval
            elapsed = time.time() - start_time
            accelerator.print(f"| epoch {epoch:3d} | {batch:5d} batches | lr {state['lr']:02.4f} | "
                              f"ms/batch {elapsed * 1000 / args.log_interval:5.2f} | loss {cur_loss:5.2f}")
            total_loss = 0.0
            start_time = time.time()


save_path = os.path.join(args.output_dir, args.save)
try:
    for epoch in amp.epochs(1, args.epochs + 1):
        epoch_start_time = time.time()
        train(epoch)
        if amp.stop:  # a stop signal: the state is saved, no half-epoch validation
            break
        val_loss = evaluate(val_data)
        accelerator.print("-" * 89)
        accelerator.print(f"| end of epoch {epoch:3d} | time: {time.time() - epoch_start_time:5.2f}s | "
                          f"valid loss {val_loss:5.2f} | valid ppl {math.exp(val_loss):8.2f}")
        accelerator.print("-" * 89)
        # Save the model if the validation loss is the best we've seen so far.
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            if accelerator.is_main_process:
                with open(save_path, "wb") as f:
                    torch.save(amp.unwrap(model), f)  # a plain module: Accelerate replaced the prepared forward
            state["best_val_loss"] = val_loss
        else:
            # Anneal the learning rate if no improvement has been seen in the validation dataset.
            state["lr"] /= 4.0
            for group in optimizer.param_groups:
                group["lr"] = state["lr"]
except KeyboardInterrupt:
    accelerator.print("-" * 89)
    accelerator.print("Exiting from training early")
accelerator.wait_for_everyone()  # the main process's save is on disk for every process
amp.close()

# Load the best saved model (none yet if training stopped in its first epoch).
if os.path.exists(save_path):
    with open(save_path, "rb") as f:
        model = torch.load(f, weights_only=False).to(device)

# Run on test data.
test_loss = evaluate(test_data)
accelerator.print("=" * 89)
best = "-" if state["best_val_loss"] is None else f"{state['best_val_loss']:5.3f}"
accelerator.print(f"| End of training | test loss {test_loss:5.2f} | test ppl {math.exp(test_loss):8.2f} | "
                  f"best val loss {best} | lr {state['lr']:.6f}")
accelerator.print("=" * 89)
