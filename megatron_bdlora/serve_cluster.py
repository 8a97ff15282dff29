"""Many replicas of the OpenAI-compatible multi-adapter server on Ray Serve, with adapter-aware routing.

  python -m megatron_bdlora.serve_cluster --config configs/serve-cluster-smollm2.yaml [--megatron-dir DIR] \\
      [--adapter NAME=DIR]... [--max-loras K] [--ray-address ADDR] [--host H] [--port P]

Each replica is one TP group of `python -m megatron_bdlora.serve` (tp ranks, one GPU each on GPU clusters) started
by a Ray Serve replica; one ingress at http://HOST:PORT has the single server's routes, bodies, errors and
streams. A request for an adapter goes to a replica that already holds it (Serve's model multiplexing, max-loras
adapters per replica); base-model requests go anywhere. Adapters given at launch are known to every replica and
loaded where they land; runtime loads/unloads through the ingress reach every replica (with the single server's
gating and API key). A replica whose engine dies is replaced by Serve, and non-streamed requests it held are
retried on other replicas for retry-window-s. /health and /metrics cover all replicas (`replica` label).

Every flag of megatron_bdlora.serve is a flag and a --config key here too; the cluster keys (replicas, autoscaling,
routing, Ray) are listed last. Ray starts locally (num-cpus) unless --ray-address joins a running cluster
(launch/slurm/serve-cluster.sbatch starts one over a job's nodes). SIGTERM/SIGINT drain the replicas and exit 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from megatron_bdlora.checkpoint.base_model import BaseModelError
from megatron_bdlora.config_file import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Check the settings, serve until SIGTERM/SIGINT, shut Ray down; the exit code."""
    from megatron_bdlora.cluster.options import load_launch

    try:
        launch = load_launch(argv, __doc__)
    except (ConfigError, FileNotFoundError, ValueError, BaseModelError) as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    # lazy: Ray and the application's imports take seconds; they load once the settings are checked
    from megatron_bdlora.cluster.runtime import running_cluster

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    with running_cluster(launch) as url:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        print(f"serving on {url}", flush=True)
        stop.wait()
        print("stopping: draining the replicas", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
