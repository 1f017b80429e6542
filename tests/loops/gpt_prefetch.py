"""A GPT training script in the shape of nanoGPT's train.py, with the AMP core put in as docs/copying-the-core.md's
"A script with its own AMP" says. Module-level code with ``--key=value`` overrides (its configurator.py); random
batches drawn by ``torch.randint`` from a uint16 token file read through ``np.memmap`` (a tiny generated one is
written when missing: no download); a ``while True:`` loop over ``iter_num`` with a cosine learning rate computed
from it; gradient accumulation over micro-steps, the next batch drawn right after the forward (the prefetch); an
``estimate_loss()`` every ``eval_interval``. Gone: its DDP set-up, the ``torch.autocast`` context, its GradScaler,
``loss / gradient_accumulation_steps`` and its checkpoint code; ``init_from='resume'`` is ``amp.resume``.

    python gpt_prefetch.py --dtype=float16 --max_iters=40
    python gpt_prefetch.py --dtype=float16 --init_from=resume
    accelerate launch --multi_gpu --num_processes 2 gpt_prefetch.py
"""

import math
import os
import sys
import time
from ast import literal_eval

import numpy as np
import torch
from gpt_model import GPT, GPTConfig

from amp import AmpSession

# -----------------------------------------------------------------------------
# default config values
out_dir = "out"
eval_interval = 10
log_interval = 5
eval_iters = 4
init_from = "scratch"  # 'scratch' or 'resume'
data_dir = "data"
gradient_accumulation_steps = 4  # used to simulate larger batch sizes (over all processes)
batch_size = 4  # the micro-batch size
block_size = 32
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.0
bias = False
learning_rate = 1e-3
max_iters = 40
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
decay_lr = True
warmup_iters = 5
lr_decay_iters = 40
min_lr = 1e-4
dtype = "float16"  # 'float32', 'bfloat16' or 'float16'
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
for arg in sys.argv[1:]:  # configurator.py: --key=value overrides a default above
    key, _, val = arg.removeprefix("--").partition("=")
    if key not in config_keys:
        raise ValueError(f"Unknown config key: {key}")
    try:
        val = literal_eval(val)
    except (SyntaxError, ValueError):
        pass
    assert type(val) is type(globals()[key]), f"--{key}: {val!r} is not a {type(globals()[key]).__name__}"
    globals()[key] = val
config = {k: globals()[k] for k in config_keys}  # will be useful for logging
# -----------------------------------------------------------------------------

# the launcher (accelerate launch, torchrun) says how many processes there are before the session exists
world_size = int(os.environ.get("WORLD_SIZE", 1))
assert gradient_accumulation_steps % world_size == 0
gradient_accumulation_steps //= world_size
amp = AmpSession(dtype, out_dir, max_steps=max_iters + 1, config=config, checkpoint_every=eval_interval,
                 log_every=log_interval, gradient_accumulation_steps=gradient_accumulation_steps)
accelerator = amp.accelerator
master_process = accelerator.is_main_process  # this process will do logging, checkpointing etc.
seed_offset = accelerator.process_index  # each process gets a different seed
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
if master_process:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
torch.manual_seed(1337 + seed_offset)
device = accelerator.device

if master_process and not os.path.exists(os.path.join(data_dir, "val.bin")):  # stands in for prepare.py
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    follow = rng.integers(0, 256, (256, 4))  # each token is followed by one of four of its own
    ids = np.zeros(24_000, dtype=np.uint16)
    for i, c in enumerate(rng.integers(0, 4, len(ids) - 1)):
        ids[i + 1] = follow[ids[i], c]
    ids[:21_600].tofile(os.path.join(data_dir, "train.bin"))
    ids[21_600:].tofile(os.path.join(data_dir, "val.bin"))
accelerator.wait_for_everyone()


def get_batch(split):
    # recreate np.memmap every batch to avoid a memory leak, as per nanoGPT
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x.to(device), y.to(device)


model = GPT(GPTConfig(block_size=block_size, vocab_size=256, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      dropout=dropout, bias=bias))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
model, optimizer = amp.prepare(model, optimizer)
ahead = amp.track({"X": None, "Y": None})  # the batch drawn ahead, in every checkpoint
amp.resume("auto" if init_from == "resume" else "none")
iter_num = amp.step


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


def get_lr(it):  # learning rate decay scheduler (cosine with warmup)
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


# training loop
X, Y = get_batch("train") if ahead["X"] is None else (ahead["X"].to(device), ahead["Y"].to(device))
t0 = time.time()
while True:
    if iter_num > max_iters:  # termination conditions (a resumed finished run starts past them)
        break
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % eval_interval == 0 and master_process:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    for _micro_step in range(gradient_accumulation_steps):
        with accelerator.accumulate(model):
            logits, loss = model(X, Y)
            # immediately async prefetch next batch while model is doing the forward pass on the GPU
            X, Y = get_batch("train")
            ahead.update(X=X, Y=Y)
            accelerator.backward(loss)
    if grad_clip != 0.0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    amp.after_step(loss, samples=gradient_accumulation_steps * batch_size, tokens=tokens_per_iter // world_size)
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0 and master_process:
        print(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms")
    iter_num += 1
amp.close()
