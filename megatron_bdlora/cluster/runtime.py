"""Ray and Serve around one cluster run: join or start Ray, warm the base model, deploy, and tear all of it down."""

from __future__ import annotations

import contextlib
from typing import Iterator

import ray
from ray import serve

from megatron_bdlora.cluster.app import APP_NAME, build_application
from megatron_bdlora.cluster.options import ClusterLaunch
from megatron_bdlora.local_ranks import free_port
from megatron_bdlora.serve import locate_base, prepare_base


def gpus_per_replica(launch: ClusterLaunch) -> int:
    """replica_gpus, else tp when the Ray cluster has at least that many GPUs, else 0 (CPU replicas)."""
    if launch.cluster.replica_gpus is not None:
        return launch.cluster.replica_gpus
    return launch.tp if ray.cluster_resources().get("GPU", 0) >= launch.tp else 0


def warm_base(launch: ClusterLaunch) -> None:
    """Convert the base for this TP once, here, so that replicas starting together do not all convert it."""
    kind, path = locate_base(launch.server, launch.where, launch.tp)
    prepare_base(kind, path, launch.tp)


@contextlib.contextmanager
def running_cluster(launch: ClusterLaunch) -> Iterator[str]:
    """Serve the application until the block ends; yields the ingress URL. Ray (and Serve) are started and stopped
    here unless ray_address joins a running cluster: then only this application is removed from it."""
    c, opts = launch.cluster, launch.server
    warm_base(launch)
    own_ray = c.ray_address is None
    ray.init(address=c.ray_address, num_cpus=c.num_cpus if own_ray else None, include_dashboard=False,
             log_to_driver=True)
    port = opts.port or free_port()
    try:
        serve.start(http_options={"host": opts.host, "port": port})
        serve.run(build_application(launch, gpus_per_replica(launch)), name=APP_NAME, route_prefix="/")
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        yield f"http://{host}:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)  # replicas drain their engines (graceful_shutdown_timeout_s)
        if own_ray:
            serve.shutdown()
        ray.shutdown()  # stops a local Ray; from a joined cluster, only disconnects
