"""Block-diagonal LoRA (BD-LoRA) under Megatron tensor parallelism."""

__version__ = "0.1.0"
