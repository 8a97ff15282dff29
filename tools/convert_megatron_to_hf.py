"""Reassemble a megatron-bdlora base checkpoint into an HF Llama checkpoint (loads with LlamaForCausalLM).

    python tools/convert_megatron_to_hf.py --megatron-dir MEG --out-dir HF

Writes HF/config.json and the tokenizer files as stored in MEG, and the weights as model.safetensors, or as
model-0000i-of-0000n.safetensors plus model.safetensors.index.json when larger than --max-shard-size.
Vocabulary padding is dropped; dtypes are kept. The output appears only when complete.
"""

from __future__ import annotations

import argparse
import re
import sys

from safetensors import SafetensorError

from megatron_bdlora.checkpoint.hf import MAX_SHARD_BYTES, convert_megatron_to_hf

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '2GB', '500MB', '1GiB' or a plain integer."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GB, 500MB, 1GiB, 1000000)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def main(argv: list[str] | None = None) -> int:
    """Parse flags, convert, and report errors as one `error: ...` line (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-dir", required=True, help="megatron base checkpoint (meta.json, tp_rank_XX/)")
    parser.add_argument("--out-dir", required=True, help="HF checkpoint directory to create")
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=MAX_SHARD_BYTES,
        help="largest weights file before splitting into several with an index json (default 2GB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert_megatron_to_hf(
            args.megatron_dir, args.out_dir, overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size, progress=not args.no_progress,
        )
    except (ValueError, OSError, SafetensorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
