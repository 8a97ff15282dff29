"""Compile the LoRA Triton kernels for a CUDA target without a GPU (Triton's own compiler and bundled ptxas), so a
CPU-only run still catches what only a GPU build would reject; run as a script by test_kernels.py, in a process
without TRITON_INTERPRET (the interpreter replaces the kernels it sees)."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_bdlora.kernels.segment_lora import lora_expand_kernel, lora_shrink_kernel


def _compile(kernel, types: dict, constexprs: dict, target: GPUTarget) -> int:
    names = kernel.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return len(triton.compile(src, target=target).asm["ptx"])


def main(capability: int) -> None:
    target = GPUTarget("cuda", capability, 32)
    pointers = dict(order_ptr="*i64", starts_ptr="*i32", counts_ptr="*i32", active_ptr="*i32")
    for dtype in ("fp32", "bf16"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for split_k in (1, 4):
            types = dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", z_ptr="*fp32" if split_k > 1 else f"*{dtype}",
                         views_ptr="*i32", **pointers,
                         **{n: "i32" for n in ("stride_xm", "stride_ws", "stride_wr", "stride_wc", "stride_zm")})
            ptx = _compile(lora_shrink_kernel, types, dict(SPLIT_K=split_k, PRECISION=precision, BLOCK_M=16, BLOCK_N=32,
                                                      BLOCK_K=128), target)
            print(f"shrink {dtype} split_k={split_k}: {ptx} chars of PTX")
        for slices in (1, 2, 3):
            each = lambda t, n=slices: tuple([t] * n)  # noqa: E731
            types = dict(z_ptr=f"*{dtype}", w_ptrs=each(f"*{dtype}"), out_ptr=f"*{dtype}", scale_ptrs=each("*fp32"),
                         views_ptrs=each("*i32"), **pointers, stride_zm="i32", stride_ws=each("i32"),
                         stride_wr=each("i32"), stride_wc=each("i32"), stride_om="i32", in_chunks="i32",
                         chunk_stride="i32", group_widths=each("i32"), group_strides=each("i32"),
                         out_offsets=each("i32"), first_tiles=each("i32", slices + 1))
            ptx = _compile(lora_expand_kernel, types, dict(SLICES=slices, PRECISION=precision, BLOCK_M=16,
                                                             BLOCK_N=64, BLOCK_K=16), target)
            print(f"packed expand {dtype} slices={slices}: {ptx} chars of PTX")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
