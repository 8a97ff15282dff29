"""Multi-adapter serving on megatron-core's dynamic inference engine (paged KV cache, continuous batching)."""
