"""Compare LoRA and BD-LoRA adapter sizes on a Llama-architecture model and find the parameter-matched BD rank.

    python tools/rank_match.py --model llama-3.1-8b --nblocks 8 --rank 16
    python tools/rank_match.py --hf-config path/to/config.json --targets q_proj,v_proj --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from megatron_bdlora.config import ALL_TARGETS
from megatron_bdlora.param_count import BUILTIN_CONFIGS, CountRow, comparison_rows, num_layers


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag documented for --help."""
    p = argparse.ArgumentParser(
        description="Adapter parameters of LoRA at rank r vs BD-LoRA (N blocks) at r, 2r, 4r and the "
        "parameter-matched BD rank (PEFT's rule: largest multiple of N not exceeding LoRA's count).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model", choices=sorted(BUILTIN_CONFIGS), help="built-in model shape to count on (Llama architecture)"
    )
    src.add_argument(
        "--hf-config", type=Path, metavar="PATH", help="Hugging Face config.json of a Llama-architecture model"
    )
    p.add_argument(
        "--nblocks", type=int, default=8, help="BD blocks N, counted at TP degree N (default: %(default)s)"
    )
    p.add_argument(
        "--rank", type=int, default=16, help="LoRA rank r; must be a multiple of --nblocks (default: %(default)s)"
    )
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated HF projections to adapt (default: all seven, %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p


def load_hf_config(path: Path) -> dict[str, Any]:
    """The config.json as a dict; ValueError naming the file if it is missing or not a JSON object."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read HF config {path}: {e.strerror or e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"HF config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"HF config {path} is not a JSON object")
    return cfg


def format_table(rows: list[CountRow]) -> str:
    """Aligned text table; ratios to 4 significant digits."""
    lines = [f"{'adapter':<12}{'mode':<16}{'rank':>6}{'parameters':>16}{'ratio':>9}"]
    for r in rows:
        lines.append(f"{r.label:<12}{r.mode:<16}{r.rank:>6}{r.parameters:>16,}{r.ratio:>#9.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, count, print; bad input exits via argparse with a message naming the problem."""
    parser = build_parser()
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        hf_config = BUILTIN_CONFIGS[args.model] if args.model else load_hf_config(args.hf_config)
        rows = comparison_rows(hf_config, targets, args.nblocks, args.rank)
        layers = num_layers(hf_config)
    except ValueError as e:
        parser.error(str(e))
    except TypeError as e:  # e.g. a shape field given as a string in config.json
        parser.error(f"{args.model or args.hf_config} has a shape field of the wrong type: {e}")
    source = args.model or str(args.hf_config)
    if args.json:
        out = dict(
            model=source,
            num_layers=layers,
            nblocks=args.nblocks,
            lora_rank=args.rank,
            matched_rank=rows[-1].rank,
            targets=targets,
            rows=[r.to_dict() for r in rows],
        )
        print(json.dumps(out, indent=2))
    else:
        print(f"{source}: {layers} layers, targets {','.join(targets)}, N={args.nblocks}, LoRA rank {args.rank}")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
