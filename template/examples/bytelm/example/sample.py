"""Generate text with a trained byte-level model."""

import sys

import torch

from ..configparse import UsageError, UsageParser
from ..export import PACKAGE, ExportError, device_arg, load_model
from .model import ByteLM


def generate_bytes(model: ByteLM, prompt: bytes, max_bytes: int, temperature: float = 0.8, top_k: int = 50,
                   seed: int = 0) -> bytes:
    """``max_bytes`` new bytes after ``prompt`` (an empty prompt starts from a newline); the same seed, the same bytes."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(prompt or b"\n")], dtype=torch.long, device=device)
    out = model.generate(idx, max_bytes, temperature=temperature, top_k=top_k, generator=gen)
    return bytes(out[0, idx.shape[1] :].tolist())


def printable(text: str) -> str:
    """``text`` with control characters other than newline and tab written as escapes (``\\x1b``)."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c != "\x7f") else c.encode("unicode_escape").decode()
                   for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = UsageParser(prog=f"python -m {PACKAGE}.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="runs/default",
                        help="an exported final/ directory, a checkpoint, or a run's out_dir (default: runs/default)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from a newline)")
    parser.add_argument("--max-bytes", type=int, default=200, help="bytes to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest bytes; 0 = all (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    notices: list[str] = []
    try:
        args = parser.parse_args(argv)
        for flag, value, ok, allowed in (("--max-bytes", args.max_bytes, args.max_bytes >= 0, ">= 0"),
                                         ("--temperature", args.temperature, 0 <= args.temperature < float("inf"),
                                          "a finite number >= 0"),
                                         ("--top-k", args.top_k, args.top_k >= 0, ">= 0")):
            if not ok:
                parser.error(f"{flag} must be {allowed}, got {value}")
        model, source = load_model(args.path, device_arg(args.device), notices)
    except (UsageError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt.encode("utf-8", errors="surrogateescape")  # bytes as typed, even if not valid UTF-8
    print("\n".join([*notices, f"sample: {source}"]), file=sys.stderr)
    new = generate_bytes(model, prompt, args.max_bytes, args.temperature, args.top_k, args.seed)
    # decode prompt and continuation together: a character may span the boundary
    text = (prompt + new).decode("utf-8", errors="replace")
    if sys.stdout.isatty():  # a barely trained model emits control bytes (ESC...): show them, do not run them
        text = printable(text)
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        print(text)
    else:  # UTF-8 whatever the console's encoding, so U+FFFD (a byte that is not UTF-8) always prints
        sys.stdout.flush()
        out.write(text.encode("utf-8") + b"\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
