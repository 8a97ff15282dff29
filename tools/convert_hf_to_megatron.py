"""Shard an HF Llama checkpoint (safetensors) into a megatron-bdlora base checkpoint for one TP degree.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir MEG --tp 2

Writes MEG/config.json (verbatim), MEG/meta.json, the tokenizer files and MEG/tp_rank_{i:02d}/model.safetensors
(see megatron_bdlora/checkpoint/hf.py for the layouts). The output appears only when complete.
"""

from __future__ import annotations

import argparse
import sys

from safetensors import SafetensorError

from megatron_bdlora.checkpoint.hf import convert_hf_to_megatron


def main(argv: list[str] | None = None) -> int:
    """Parse flags, convert, and report errors as one `error: ...` line (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True,
                        help="HF checkpoint: config.json + model.safetensors (or an index json)")
    parser.add_argument("--out-dir", required=True, help="megatron base checkpoint directory to create")
    parser.add_argument("--tp", type=int, required=True,
                        help="tensor-parallel degree; must divide the (KV) heads and ffn size")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert_hf_to_megatron(args.hf_dir, args.out_dir, args.tp, overwrite=args.overwrite,
                                     progress=not args.no_progress)
    except (ValueError, OSError, SafetensorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tp={args.tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
