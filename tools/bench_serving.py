"""Serve one seeded multi-adapter workload through our serving loop in each LoRA sharding mode and compare.

    python tools/bench_serving.py --tp 2 --modes block_diagonal,slora,replicated,none \\
        --json runs/bench_serving.json --plot runs/bench_serving.png
    python tools/bench_serving.py --tp 1 --peft --json runs/bench_serving_tp1.json --plot runs/bench_serving_tp1.png
    python tools/bench_serving.py --tp 2 --model-shape llama-3.1-8b --layers 2 --paper-ranks --json runs/paper_tp2.json
    python tools/bench_serving.py --model random --modes block_diagonal --num-adapters 1000 --max-loras 8 \
        --max-cpu-loras 64 --mixed-formats --json runs/bench_1000_adapters.json

The workload, the systems, what is measured and how: megatron_bdlora.bench.serving, which also holds the flags
(tools/bench_sweep.py runs this benchmark once per point with the same flags).
"""

from __future__ import annotations

from megatron_bdlora.bench.serving import parse_args, run


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables, write JSON and PNG; returns what the JSON holds."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
