"""The Ray Serve application: Ingress -> EngineReplica x N, both reporting through one ReplicaBoard.

Placement: a replica is one Ray actor that reserves its whole TP group's resources (`tp` GPUs on GPU clusters) and
runs the TP ranks as its child processes. One actor holding all `tp` GPUs lands on one node by construction, and
Ray sets CUDA_VISIBLE_DEVICES of the actor, which torchrun's ranks inherit, to exactly those GPUs (one per rank,
by LOCAL_RANK) - the guarantee of a STRICT_PACK placement group with a GPU bundle per rank, without scheduling the
ranks as Ray actors that would need their own rendezvous. On CPU a replica reserves `replica_cpus`.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application

from megatron_bdlora.cluster.board import ReplicaBoard
from megatron_bdlora.cluster.ingress import Ingress, IngressSettings
from megatron_bdlora.cluster.messages import ReplicaSpec
from megatron_bdlora.cluster.options import ClusterLaunch, replica_settings
from megatron_bdlora.cluster.replica import EngineReplica
from megatron_bdlora.inference.policy import api_key_from
from megatron_bdlora.inference.serving_config import ServingConfig

APP_NAME = "bdlora"
_STALE_REPORTS = 10  # report intervals without news before a replica counts as gone
_REPORT_INTERVAL_S = 0.5


def autoscaling_config(launch: ClusterLaunch) -> dict | None:
    """Serve's autoscaling_config from the YAML keys; None: a fixed number of replicas."""
    c = launch.cluster
    if c.max_replicas is None:
        return None
    return {"min_replicas": c.min_replicas or 1, "max_replicas": c.max_replicas,
            "target_ongoing_requests": c.target_ongoing_requests, "upscale_delay_s": c.upscale_delay_s,
            "downscale_delay_s": c.downscale_delay_s, "look_back_period_s": c.look_back_period_s}


def adapters_per_replica(launch: ClusterLaunch) -> int:
    """How many adapters Serve's router ties to one replica: its device slots, so that the adapters routed to a
    replica stay loaded (more would swap slots; the host cache keeps the rest warm either way)."""
    return launch.server.max_loras or ServingConfig.max_loras


def build_application(launch: ClusterLaunch, gpus_per_replica: int) -> Application:
    """The bound application, ready for serve.run."""
    c, opts = launch.cluster, launch.server
    api_key = api_key_from(opts.api_key)
    spec = ReplicaSpec(server_settings=replica_settings(opts, launch.tp), tp=launch.tp, api_key=api_key,
                       cwd=os.getcwd(), env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                       startup_timeout_s=c.startup_timeout_s, report_interval_s=_REPORT_INTERVAL_S)
    board = serve.deployment(ReplicaBoard, name="ReplicaBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             logging_config={"log_level": "WARNING"},  # not a line per report (two a second each)
                             ).bind(_STALE_REPORTS * _REPORT_INTERVAL_S)
    scaling = autoscaling_config(launch)
    engines = serve.deployment(
        EngineReplica, name="EngineReplica",
        **({"autoscaling_config": scaling} if scaling else {"num_replicas": c.replicas}),
        ray_actor_options={"num_cpus": c.replica_cpus, "num_gpus": gpus_per_replica},
        max_ongoing_requests=opts.max_queued_requests,  # more would be refused by the engine (429); Serve queues them
        health_check_period_s=c.health_check_period_s,
        graceful_shutdown_timeout_s=opts.drain_timeout + 10,  # the engine drains within drain_timeout
    ).bind(spec, board, adapters_per_replica(launch))
    settings = IngressSettings(adapters=tuple(opts.adapters or ()), route_by_adapter=c.routing == "adapter",
                               retry_window_s=c.retry_window_s, api_key=api_key,
                               max_request_bytes=opts.max_request_bytes)
    return serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=100_000,
                            ray_actor_options={"num_cpus": 0}).bind(engines, board, settings)

