"""tree.py with each field comment moved into an attribute docstring (what jsonargparse reads for its help)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScalerConfig:
    """GradScaler knobs, passed to Accelerate as GradScalerKwargs (fp16 only)."""

    init_scale: float = 65536.0
    """2**16, PyTorch's default; at most 3.4e38 (a float32)"""
    growth_factor: float = 2.0
    """scale *= growth_factor after growth_interval clean steps"""
    backoff_factor: float = 0.5
    """scale *= backoff_factor on an overflow (step skipped)"""
    growth_interval: int = 2000
    """clean steps before the scale grows"""


@dataclass
class GuardConfig:
    """What to do when the loss scale collapses (every step skipped, scale driven toward 0)."""

    min_scale: float = 2**-14
    """a scale below this counts as collapsed (2**-14)"""
    max_consecutive_skips: int = 50
    """this many skipped steps in a row counts too"""
    action: str = "warn"
    """warn | stop (save and exit 3) | fallback (save, go on in a safer precision)"""


@dataclass
class AutoConfig:
    """How amp.precision=auto decides where the hardware alone cannot (a CPU with AVX512-BF16 or AMX, a GPU)."""

    measure: bool = True
    """time fp32 and bf16 (and fp16 on a GPU) on this model first; cached per machine and shape"""


@dataclass
class AmpConfig:
    """Mixed precision: which precision runs, and the fp16 loss scaler and its guard."""

    precision: str = "auto"
    """auto | fp32 | bf16 | fp16 ("no" is read as fp32)"""
    auto: AutoConfig = field(default_factory=AutoConfig)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    fp32_modules: list[str] = field(default_factory=list)
    """module name patterns run without autocast"""
    tf32: bool = True
    """TF32 matmuls on Ampere+ GPUs when running fp32 parts"""
    cudnn_benchmark: bool = False
    """let cuDNN pick the fastest kernels (not bitwise reproducible)"""


@dataclass
class TrainConfig:
    """The optimizer (AdamW), its warmup + cosine learning-rate schedule, and the batch."""

    max_steps: int = 500
    """optimizer steps"""
    batch_size: int = 32
    """per process, per micro-step"""
    lr: float = 2e-3
    """peak learning rate, reached after warmup"""
    min_lr: float = 2e-4
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 30
    """linear warmup, in optimizer steps"""
    weight_decay: float = 0.1
    """AdamW decay on 2-D weights (matrices, embeddings); none on biases and norms"""
    grad_accum: int = 1
    """micro-steps per optimizer step"""
    grad_clip: float = 1.0
    """max gradient norm; 0 disables clipping"""
    fused_optimizer: bool = False
    """fused AdamW kernel (CUDA, or CPU with torch >= 2.4)"""
    compile: bool = False
    """torch.compile the model (inductor); the first steps pay for compilation"""


@dataclass
class DataConfig:
    """The text the model learns, cut into byte blocks of seq_len + 1."""

    files: list[str] = field(default_factory=list)
    """local text files or globs; empty = Python's stdlib sources"""
    hub_name: str = ""
    """a datasets hub name, for users with a network; never the default"""
    text_column: str = "text"
    """the column holding the text (data.hub_name only)"""
    seq_len: int = 128
    """bytes of context per block"""
    max_bytes: int = 3_000_000
    """cap on the default corpus; 0 = no cap"""
    val_fraction: float = 0.05
    """the last blocks held out for evaluation"""
    num_workers: int = 0
    """DataLoader worker processes"""


@dataclass
class ModelConfig:
    """The small byte-level transformer."""

    d_model: int = 192
    """width of the residual stream"""
    n_layer: int = 4
    """transformer blocks"""
    n_head: int = 6
    """attention heads; must divide d_model"""
    dropout: float = 0.0
    """dropout probability in [0, 1)"""


@dataclass
class EvalConfig:
    """Held-out accuracy, loss and perplexity on the validation split."""

    every: int = 0
    """steps between evals; 0 = only at the end"""
    batches: int = 20
    """val batches per eval; 0 = the whole split"""
    precision: str = "train"
    """train = in the training precision; fp32 = in full precision, autocast off"""


@dataclass
class CheckpointConfig:
    """Atomic checkpoints in out_dir/checkpoints (resume restores everything)."""

    every: int = 250
    """steps between checkpoints; 0 = only at the end"""
    keep: int = 3
    """newest checkpoints kept"""


@dataclass
class LogConfig:
    """Console, metrics.jsonl and trackers."""

    every: int = 10
    """steps between log lines / metric reads (the only device syncs of the monitor)"""
    live: bool = True
    """rich live panel on a terminal; plain lines when false or not a TTY"""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers, e.g. [tensorboard] or [wandb]"""
    run_name: str = ""
    """the trackers' project/run name; empty = the name of out_dir"""
    tracker_kwargs: dict = field(default_factory=dict)
    """per tracker, e.g. {wandb: {entity: me, tags: [amp]}}"""


@dataclass
class Config:
    """The run: where it writes, its seed, and where it resumes from."""

    out_dir: str = "runs/default"
    """checkpoints, metrics.jsonl and amp_summary.json go here"""
    seed: int = 0
    """model init and data order"""
    resume: str = "auto"
    """auto | none | PATH to a checkpoint directory"""
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
