"""Fine-tune LoRA and BD-LoRA adapters on the demo tasks, then score every adapter with transformers + PEFT.

    python tools/compare_quality.py --out docs/quality.json [--steps S] [--seeds 0 1] [--tasks ...] \\
        [--work-dir runs/quality]

The methods, tasks, metrics and flags: megatron_bdlora.bench.quality (`--help`).
"""

from __future__ import annotations

import sys

from megatron_bdlora.bench.quality import main

if __name__ == "__main__":
    sys.exit(main())
