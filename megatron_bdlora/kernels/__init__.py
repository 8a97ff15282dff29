"""Triton kernels for multi-adapter LoRA (imported as megatron_bdlora.kernels; needs Triton, and CUDA tensors or
Triton's interpreter, TRITON_INTERPRET=1). `megatron_bdlora.ops` dispatches here; call these through it."""

from megatron_bdlora.kernels.launch import expand, expand_packed, shrink, shrink_packed

__all__ = ["expand", "expand_packed", "shrink", "shrink_packed"]
