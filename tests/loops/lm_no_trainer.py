"""A causal language model trained in the shape of Transformers' examples/pytorch/language-modeling/
run_clm_no_trainer.py, with the AMP core put in as docs/copying-the-core.md says: its argparse flags, its own
``accelerator.init_trackers`` (kept: the session runs the trackers, a second call is ignored), ``completed_steps``,
an evaluation (perplexity) after each epoch, and after training ``save_pretrained`` and ``all_results.json``. Its
checkpoint code (``accelerator.save_state`` every ``--checkpointing_steps``, the lines that resumed from
``--resume_from_checkpoint``) is the session's now. The model is a small causal LM written here and the data are
random token ids from a local tensor: no download, no transformers. The precision is the launcher's.

    accelerate launch --mixed_precision fp16 lm_no_trainer.py --output_dir out --max_train_steps 40
    python lm_no_trainer.py --output_dir out --resume_from_checkpoint out/step_20   # a plain save_state folder too
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from amp import AmpSession


def parse_args():
    parser = argparse.ArgumentParser(description="Train a causal language model on a causal language modeling task")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--max_train_steps", type=int, default=None, help="if set, overrides num_train_epochs")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--num_warmup_steps", type=int, default=0)
    parser.add_argument("--output_dir", type=str, default="runs/clm_no_trainer")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--checkpointing_steps", type=str, default=None, help="save the state every n steps")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="a checkpoint folder to go on from")
    parser.add_argument("--with_tracking", action="store_true", help="enable experiment trackers for logging")
    parser.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, ... or all")
    return parser.parse_args()


class CausalLMOutput(dict):
    """What a Transformers model returns, in small: a dict whose keys read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TinyCausalLM(nn.Module):
    """Stands in for AutoModelForCausalLM.from_config: embeddings, one pre-norm Transformer layer, a head."""

    def __init__(self, vocab_size=128, n_embd=32, block_size=32):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "n_embd": n_embd, "block_size": block_size}
        self.embed_tokens = nn.Embedding(vocab_size, n_embd)
        self.embed_positions = nn.Embedding(block_size, n_embd)
        self.layer = nn.TransformerEncoderLayer(n_embd, 2, 4 * n_embd, dropout=0.0, batch_first=True, norm_first=True)
        self.layer_norm = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, input_ids, labels=None):
        T = input_ids.size(1)
        x = self.embed_tokens(input_ids) + self.embed_positions(torch.arange(T, device=input_ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        logits = self.lm_head(self.layer_norm(self.layer(x, src_mask=mask, is_causal=True)))
        loss = None
        if labels is not None:  # shifted here, as Transformers' causal LMs do
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory, is_main_process=True, save_function=torch.save):
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                      os.path.join(save_directory, "model.safetensors"))
            with open(os.path.join(save_directory, "config.json"), "w") as f:
                json.dump(self.config, f)


def main():  # noqa: C901 - one function, as run_clm_no_trainer.py has it
    args = parse_args()
    accelerator_log_kwargs = {}
    if args.with_tracking:
        accelerator_log_kwargs["log_with"] = args.report_to
        accelerator_log_kwargs["project_dir"] = args.output_dir
    checkpointing_steps = args.checkpointing_steps
    # every n optimizer steps; "epoch" has no counterpart: the session saves at a stop and at the end
    checkpoint_every = int(checkpointing_steps) if checkpointing_steps and checkpointing_steps.isdigit() else 0
    amp = AmpSession(None, args.output_dir, max_steps=args.max_train_steps, config=vars(args), run_name="clm_no_trainer",
                     checkpoint_every=checkpoint_every, gradient_accumulation_steps=args.gradient_accumulation_steps,
                     **accelerator_log_kwargs)
    accelerator = amp.accelerator
    if args.seed is not None:
        set_seed(args.seed)

    tokens = torch.randint(0, 128, (288, args.block_size), generator=torch.Generator().manual_seed(0))  # "tokenized"
    train_dataset = [{"input_ids": t, "labels": t} for t in tokens[:256]]
    eval_dataset = [{"input_ids": t, "labels": t} for t in tokens[256:]]
    model = TinyCausalLM(block_size=args.block_size)
    train_dataloader = DataLoader(train_dataset, shuffle=True, batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size)

    no_decay = ["bias", "layer_norm.weight"]
    optimizer_grouped_parameters = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=args.learning_rate)
    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True
    warmup = args.num_warmup_steps * accelerator.num_processes
    total = args.max_train_steps if overrode_max_train_steps else args.max_train_steps * accelerator.num_processes
    lr_scheduler = LambdaLR(optimizer, lambda s: min((s + 1) / (warmup + 1), max(0.0, (total - s) / max(1, total - warmup))))
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = amp.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    amp.resume(args.resume_from_checkpoint or "auto")
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if args.with_tracking:
        experiment_config = vars(args)
        accelerator.init_trackers("clm_no_trainer", experiment_config)

    def evaluate():
        model.eval()
        losses = []
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            losses.append(accelerator.gather_for_metrics(outputs.loss.repeat(args.per_device_eval_batch_size)))
        eval_loss = torch.mean(torch.cat(losses))
        try:
            perplexity = math.exp(eval_loss)
        except OverflowError:
            perplexity = float("inf")
        return perplexity, eval_loss

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(f"***** Running training ***** total batch size {total_batch_size}, "
                      f"{args.max_train_steps} optimization steps")
    completed_steps = first_step = amp.step
    for epoch in amp.epochs(args.num_train_epochs):
        model.train()
        if args.with_tracking:
            total_loss = 0
        for batch in amp.batches(train_dataloader):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                if args.with_tracking:
                    total_loss += loss.detach().float()
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            amp.after_step(loss)
            if accelerator.sync_gradients:
                completed_steps += 1
            if completed_steps >= args.max_train_steps:
                break
        if amp.stop:
            break  # the state is saved: no half-epoch evaluation
        perplexity, eval_loss = evaluate()
        accelerator.print(f"epoch {epoch}: perplexity: {perplexity} eval_loss: {eval_loss}")
        if args.with_tracking:
            accelerator.log({"perplexity": perplexity, "eval_loss": eval_loss, "train_loss": total_loss.item() / len(
                train_dataloader), "epoch": epoch, "step": completed_steps}, step=completed_steps)

    if amp.stop or amp.step == first_step:  # stopped (its state saved) or nothing left to train: no final results
        sys.exit(amp.close())
    perplexity, eval_loss = evaluate()
    accelerator.print(f"final: perplexity: {perplexity} eval_loss: {eval_loss}")
    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        unwrapped_model = accelerator.unwrap_model(model)
        unwrapped_model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                        save_function=accelerator.save)
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
                json.dump({"perplexity": perplexity}, f)
    sys.exit(amp.close())


if __name__ == "__main__":
    main()
