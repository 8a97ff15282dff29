"""Checkpoints on disk: HF Llama <-> TP-sharded megatron base weights, and the embedded SmolLM2 base model."""
