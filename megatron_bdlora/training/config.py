"""Training run configuration: a Megatron-style YAML file plus `key.sub=value` overrides, strictly checked.

Every section is a dataclass; an unknown key anywhere is an error naming its full path, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.config_file import ConfigError, build_section
from megatron_bdlora.training.checkpoint import check_resume
from megatron_bdlora.training.data import require_data_file


@dataclass
class ModelSection:
    base: str = "smollm2-135m-instruct"  # the embedded default, or a Hugging Face model directory
    random_config: dict | None = None  # build a random Llama of this shape (uses the base's tokenizer)
    dtype: str = "float32"  # float32 | bfloat16


@dataclass
class ParallelSection:
    tp: int = 1
    dp: int | None = None  # None: world size / tp
    micro_batch_size: int = 1
    global_batch_size: int = 8


@dataclass
class LoRASection:
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    mode: str = "block_diagonal"
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    nblocks: int | None = None  # block_diagonal only; None = tp
    # start from this adapter instead of PEFT's init: a native adapter saved at any TP (resharded in memory) or a
    # PEFT directory; its rank, alpha, mode, nblocks and targets must equal the ones above
    init: str | None = None

    def settings(self, seed: int) -> LoRASettings:
        return LoRASettings(
            rank=self.rank,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
            dropout=self.dropout,
            mode=self.mode,
            nblocks=self.nblocks,
            targets=tuple(self.targets),
            seed=seed,
        )


@dataclass
class OptimizerSection:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleSection:
    train_steps: int = 100
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio


@dataclass
class DeepSpeedSection:
    zero_stage: int = 1  # 0, 1 or 2: optimizer state (and gradients at 2) sharded over data parallel ranks


@dataclass
class DataSection:
    train: str = "data/milton/train.txt"
    valid: str | None = None
    format: str = "text"  # text | chat
    seq_length: int = 128


@dataclass
class CheckpointSection:
    dir: str | None = None  # default: <logging.dir>/checkpoints
    every: int = 50  # steps between checkpoints (and always at the end); 0 = only at the end
    keep: int = 2  # newest complete checkpoints kept


@dataclass
class LoggingSection:
    dir: str = "runs/default"
    every: int = 1
    eval_every: int = 0  # 0 = only at the end (when data.valid is set)
    eval_batches: int = 8
    tensorboard: bool = False
    progress: bool = True
    # steps whose adapter weights (before), accumulated gradients (before clipping) and Adam exp_avg (after) are
    # written as native adapters to <dir>/dump/step_NNNNNN/{weights,grads,exp_avg} (debugging, gradient tests)
    dump_steps: list[int] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    seed: int = 1234

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpoint_dir(self) -> Path:
        """Where the run's checkpoints go: checkpoint.dir, else <logging.dir>/checkpoints."""
        return Path(self.checkpoint.dir or Path(self.logging.dir) / "checkpoints")


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split: DP ranks x accumulation steps x micro-batches."""

    world_size: int
    tp: int
    dp: int
    micro_batch_size: int
    grad_accum: int  # micro-batches per DP rank per step
    global_batch_size: int  # sequences per step
    seq_length: int

    @property
    def tokens_per_step(self) -> int:
        """Input tokens of one step, all DP ranks (loss tokens can be fewer with chat data)."""
        return self.global_batch_size * self.seq_length


def batch_layout(cfg: TrainConfig, world_size: int) -> BatchLayout:
    """The step layout at this world size; ConfigError names the sizes that do not divide."""
    p = cfg.parallel
    if world_size < 1 or world_size % p.tp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp={p.tp}")
    dp = world_size // p.tp
    if p.dp is not None and p.dp != dp:
        raise ConfigError(f"parallel.dp={p.dp} but world size {world_size} / tp {p.tp} gives {dp}")
    if p.global_batch_size % (p.micro_batch_size * dp):
        raise ConfigError(
            f"parallel.global_batch_size={p.global_batch_size} is not divisible by "
            f"micro_batch_size={p.micro_batch_size} x dp={dp}"
        )
    grad_accum = p.global_batch_size // (p.micro_batch_size * dp)
    return BatchLayout(world_size, p.tp, dp, p.micro_batch_size, grad_accum, p.global_batch_size, cfg.data.seq_length)


def check_run_files(cfg: TrainConfig, world_size: int, resume: bool) -> BatchLayout:
    """The run's checks that read no model (layout, checkpoint to resume and its LoRA settings, data files), so the
    trainer's command line answers them before its heavy imports; raises ConfigError / FileNotFoundError."""
    layout = batch_layout(cfg, world_size)
    if resume:
        try:
            check_resume(cfg.checkpoint_dir(), layout.tp, layout.dp, cfg.lora.settings(cfg.seed))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for key, path in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        if path is not None:
            require_data_file(path, key)
    return layout


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML run config and apply `key.sub=value` overrides (values parsed as YAML scalars)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        _set_path(raw, key.strip(), yaml.safe_load(value))
    config = build_section(TrainConfig, raw, "")
    check_config(config)
    return config


def check_config(cfg: TrainConfig) -> None:
    """Consistency checks that need no model files (those follow in the trainer, still before any group)."""
    p = cfg.parallel
    for name in ("tp", "micro_batch_size", "global_batch_size"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if cfg.lora.nblocks is not None and cfg.lora.mode == "block_diagonal" and cfg.lora.nblocks % p.tp:
        raise ConfigError(f"lora.nblocks={cfg.lora.nblocks} is not a multiple of parallel.tp={p.tp}")
    if cfg.data.format not in ("text", "chat"):
        raise ConfigError(f"data.format must be 'text' or 'chat', got {cfg.data.format!r}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1 or 2, got {cfg.deepspeed.zero_stage}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    if cfg.schedule.warmup_steps > cfg.schedule.train_steps:
        raise ConfigError("schedule.warmup_steps exceeds schedule.train_steps")
    try:
        cfg.lora.settings(cfg.seed)
    except ValueError as err:
        raise ConfigError(f"lora: {err}") from None
