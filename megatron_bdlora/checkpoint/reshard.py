"""Change an adapter's TP degree, and its sharding mode or block count where that is exact.

Every conversion goes through the dense matrix: a stored factor with `src` blocks is expanded to its dense
form and packed again with `dst` blocks. Expanding is always exact; packing is exact exactly when the dense
factor is block-diagonal for `dst` blocks, and otherwise refused with the largest off-block magnitude.
So BD -> S-LoRA / replicated always works; LoRA -> BD only if the factor that must be block-diagonal is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from megatron_bdlora.checkpoint.adapters import (
    AdapterCheckpoint,
    AdapterCheckpointError,
    Factors,
    factor_key,
    load_native,
    save_native,
)
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.sharding import Mode, parse_mode, repack_factor


def target_settings(
    settings: LoRASettings, tp: int, mode: Mode | str | None = None, nblocks: int | None = None
) -> LoRASettings:
    """Settings at a new TP degree / mode; nblocks kept from a BD source unless given, else the new TP degree."""
    if tp < 1:
        raise AdapterCheckpointError(f"tp must be positive, got {tp}")
    mode = settings.mode if mode is None else parse_mode(mode)
    if mode is not Mode.BLOCK_DIAGONAL:
        if nblocks is not None:
            raise AdapterCheckpointError(f"nblocks={nblocks} only applies to mode block_diagonal, not {mode.value}")
        return dataclasses.replace(settings, mode=mode, nblocks=None)
    if nblocks is None:
        nblocks = settings.nblocks if settings.mode is Mode.BLOCK_DIAGONAL and settings.nblocks else tp
    if nblocks % tp:
        divisors = [d for d in range(1, nblocks + 1) if nblocks % d == 0]
        raise AdapterCheckpointError(
            f"a block-diagonal adapter with nblocks={nblocks} cannot run at tp={tp}: tp must divide nblocks "
            f"(possible tp: {divisors}); or convert with mode slora or replicated, which is exact"
        )
    return dataclasses.replace(settings, mode=mode, nblocks=nblocks)


def convert_factors(
    factors: Factors,
    src_blocks: dict[tuple[int, str], tuple[int, int]],
    dst: AdapterCheckpoint,
    names: dict[tuple[int, str], tuple[str, str]] | None = None,
) -> AdapterCheckpoint:
    """Fill `dst.factors` from stored factors with known (A, B) block counts, repacked for dst's plans."""
    plans = dst.plans()
    for (layer, proj), (a, b) in factors.items():
        plan = plans[proj]
        na, nb = src_blocks[(layer, proj)]
        default = (factor_key(layer, proj, "A"), factor_key(layer, proj, "B"))
        name_a, name_b = (names or {}).get((layer, proj), default)
        try:
            dst.factors[(layer, proj)] = (
                repack_factor(a, na, plan.a.packed_blocks, name_a),
                repack_factor(b, nb, plan.b.packed_blocks, name_b),
            )
        except ValueError as e:
            raise AdapterCheckpointError(
                f"cannot convert to mode {dst.settings.mode.value} (nblocks={dst.settings.nblocks}) exactly: {e}; "
                "mode slora or replicated holds any adapter exactly"
            ) from None
    dst.validate()
    return dst


def reshard(
    ckpt: AdapterCheckpoint, tp: int, mode: Mode | str | None = None, nblocks: int | None = None
) -> AdapterCheckpoint:
    """The same adapter sharded for another TP degree (and mode / block count, where exact)."""
    settings = target_settings(ckpt.settings, tp, mode, nblocks)
    dst = AdapterCheckpoint(settings, ckpt.base_shape, tp, {}, ckpt.base_model_name)
    src_plans = ckpt.plans()
    blocks = {k: (src_plans[k[1]].a.packed_blocks, src_plans[k[1]].b.packed_blocks) for k in ckpt.factors}
    return convert_factors(ckpt.factors, blocks, dst)


def reshard_directory(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int,
    mode: Mode | str | None = None,
    nblocks: int | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Read a native checkpoint, reshard it, write it to out_dir (atomically)."""
    return save_native(reshard(load_native(adapter_dir), tp, mode, nblocks), out_dir, overwrite=overwrite)
