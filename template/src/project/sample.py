"""Generate text with a trained byte-level model.

    python -m PACKAGE.sample --prompt "def "                            # runs/default: newest checkpoint
    python -m PACKAGE.sample runs/default/final --prompt "def " --max-bytes 400 --temperature 0.8 --top-k 50
    python -m PACKAGE.sample runs/a/checkpoints/step_0000200 --temperature 0   # greedy

The model source is an exported directory (``final/``, read with ``ByteLM.from_pretrained``), a training
checkpoint, or a run's ``out_dir`` (its newest complete checkpoint, else its ``final/``). The prompt and
the continuation go to stdout; which weights were used goes to stderr. The same ``--seed`` gives the same
text. A bad path or argument gets one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from .amp.checkpoint import CHECKPOINTS
from .export import PACKAGE, WEIGHTS, ArgParser, ExportError, find_checkpoint, load_checkpoint
from .model import ByteLM


def _resolve(path: Path, notices: list[str] | None = None) -> Path:
    """An export or checkpoint as given; for a run's out_dir, its newest complete checkpoint, else its final/."""
    if (path / "config.json").is_file() or (path / "meta.json").exists():
        return path
    final = path / "final"
    if (path / CHECKPOINTS).is_dir():
        try:
            return find_checkpoint(path, notices)
        except ExportError:
            if not (final / "config.json").is_file():
                raise
    return final if (final / "config.json").is_file() else path  # else load_checkpoint names what is wrong


def load_model(path: str | Path, device: str | torch.device = "cpu",
               notices: list[str] | None = None) -> tuple[ByteLM, str]:
    """The model at ``path`` (export, checkpoint or out_dir) in eval mode, and a line saying which weights.
    ``notices`` receives why a newer checkpoint was skipped, as training says it."""
    path = _resolve(Path(path), notices)
    if (path / "config.json").is_file():
        if not (path / WEIGHTS).is_file():
            raise ExportError(f"{path}: no {WEIGHTS} beside config.json")
        try:
            model = ByteLM.from_pretrained(str(path), map_location=str(device))
        except (TypeError, ValueError, RuntimeError, OSError, SafetensorError) as e:  # files that do not fit
            raise ExportError(f"{path}: not a loadable ByteLM export ({str(e).splitlines()[0]})") from None
        return model, f"sample: weights from {path} (exported model)"
    model, meta, ckpt = load_checkpoint(path, device)
    prec = (meta.get("precision") or {}).get("effective", "?")
    return model, f"sample: weights from {ckpt} (step {meta.get('step', '?')}, trained in {prec})"


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


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # unknown type, or no such device on this machine
        raise ExportError(f"--device {name}: not usable here ({str(e).splitlines()[0]})") from None
    return device


def main(argv: list[str] | None = None) -> int:
    """``python -m PACKAGE.sample [PATH] --prompt TEXT ...``; returns the exit code."""
    parser = ArgParser(prog=f"python -m {PACKAGE}.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="runs/default",
                        help="an exported final/ directory, a checkpoint, or a run's out_dir (default: runs/default)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from a newline)")
    parser.add_argument("--max-bytes", type=int, default=200, help="bytes to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest bytes; 0 = all (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    args = parser.parse_args(argv)
    for flag, value, ok, allowed in (("--max-bytes", args.max_bytes, args.max_bytes >= 0, ">= 0"),
                                     ("--temperature", args.temperature, 0 <= args.temperature < float("inf"),
                                      "a finite number >= 0"),
                                     ("--top-k", args.top_k, args.top_k >= 0, ">= 0")):
        if not ok:
            parser.error(f"{flag} must be {allowed}, got {value}")
    prompt = args.prompt.encode("utf-8", errors="surrogateescape")  # bytes as typed, even if not valid UTF-8
    notices: list[str] = []
    try:
        model, source = load_model(args.path, _device(args.device), notices)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in [*notices, source]:
        print(line, file=sys.stderr)
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
