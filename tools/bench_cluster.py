"""Adapter-aware routing vs Ray's default routing on 2 replicas, one seeded many-adapter workload.

    python tools/bench_cluster.py --config configs/serve-cluster-smollm2.yaml --max-loras 2 \\
        --num-adapters 4 --num-requests 64 --json runs/bench_cluster.json

Reports tokens/s, time to first token and adapter loads/evictions per replica for each routing; the workload and
what is measured: megatron_bdlora.cluster.bench. Flags it does not know go to python -m megatron_bdlora.serve_cluster.
"""

from __future__ import annotations

from megatron_bdlora.cluster.bench import run


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write JSON; returns what the JSON holds."""
    return run(argv)


if __name__ == "__main__":
    main()
