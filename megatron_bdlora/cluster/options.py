"""The cluster's settings: every single-server setting (megatron_bdlora.serve's ServeOptions, same keys and flags,
read by serve.py itself) plus the replica, autoscaling, routing and failover keys of ClusterOptions.

One YAML holds both; its cluster keys are taken out here and the rest is read by serve.load_options, so a single
server's config works unchanged as a cluster's and each key keeps one meaning and one check.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from megatron_bdlora import serve
from megatron_bdlora.config_file import ConfigError, build_section
from megatron_bdlora.serve import ServeOptions

ROUTINGS = ("adapter", "default")


def _key(help: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ClusterOptions:
    """Keys of a cluster YAML (and flags of the same name) that a single server does not have."""

    replicas: int = _key("engine replicas (each one TP group of `tp` ranks) when not autoscaling", 1)
    min_replicas: int | None = _key("autoscaling: fewest replicas (default 1); autoscaling is on when max-replicas "
                                    "is set")
    max_replicas: int | None = _key("autoscaling: most replicas; turns autoscaling on")
    target_ongoing_requests: float = _key("autoscaling: requests in flight per replica Serve aims at (more: scale "
                                          "up, fewer: scale down)", 2.0)
    upscale_delay_s: float = _key("autoscaling: seconds the load must call for more replicas before one is added",
                                  30.0)
    downscale_delay_s: float = _key("autoscaling: seconds the load must call for fewer replicas before one is "
                                    "removed", 600.0)
    look_back_period_s: float = _key("autoscaling: seconds of load history averaged into each decision", 30.0)
    routing: str = _key("adapter: a request for an adapter goes to a replica that holds it (Serve's model "
                        "multiplexing, at most max-loras adapters per replica); default: Ray's default routing "
                        "(the benchmark's baseline)", "adapter")
    retry_window_s: float = _key("seconds a request whose replica died is retried on others before a 503", 60.0)
    ray_address: str | None = _key("join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting a local one")
    num_cpus: int | None = _key("CPUs of a local Ray instance (default: all); ignored with ray-address")
    replica_cpus: float = _key("CPUs Ray reserves for each replica", 1.0)
    replica_gpus: int | None = _key("GPUs Ray reserves for each replica (default: tp when the Ray cluster has GPUs, "
                                    "else 0)")
    health_check_period_s: float = _key("seconds between Serve's health checks of a replica (three failed checks "
                                        "replace it)", 1.0)
    startup_timeout_s: float = _key("seconds a replica's engine may take to start serving", 600.0)


CLUSTER_KEYS = tuple(f.name for f in fields(ClusterOptions))


@dataclass
class ClusterLaunch:
    """Everything serve_cluster needs: both option sets, checked, with where each given setting came from."""

    cluster: ClusterOptions
    server: ServeOptions
    where: dict[str, str]

    @property
    def tp(self) -> int:
        return self.server.tp or 1


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The single server's flags (serve.build_parser) plus one flag per ClusterOptions key."""
    p = serve.build_parser()
    p.prog, p.description = "python -m megatron_bdlora.serve_cluster", description
    _add_cluster_flags(p.add_argument_group("cluster (Ray Serve)"))
    return p


def _add_cluster_flags(group: Any) -> None:
    hints = typing.get_type_hints(ClusterOptions)
    for f in fields(ClusterOptions):
        kind = next(a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None))
        default = f" (default {f.default})" if f.default is not None else ""
        metavar = {int: "N", float: "X"}.get(kind, "VALUE") if f.name != "routing" else None
        group.add_argument(serve.flag(f.name), dest=f.name, type=kind, metavar=metavar,
                           choices=ROUTINGS if f.name == "routing" else None, help=f.metadata["help"] + default)


def _cluster_only_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    p.add_argument("--config")
    _add_cluster_flags(p)
    return p


def load_launch(argv: list[str] | None, description: str = "") -> ClusterLaunch:
    """Flags over the YAML, both halves checked; ConfigError names the flag or key at fault."""
    build_parser(description).parse_args(argv)  # --help, and every flag's own check, over the whole command line
    given, server_argv = _cluster_only_parser().parse_known_args(argv)
    given = vars(given)
    config = given.pop("config", None)
    raw = serve.read_yaml(config) if config is not None else {}
    cluster_raw = {k: v for k, v in raw.items() if k in CLUSTER_KEYS}
    try:
        cluster = build_section(ClusterOptions, cluster_raw, "")
    except ConfigError as err:
        raise ConfigError(f"{config}: {err}") from None
    for key, value in given.items():
        setattr(cluster, key, value)
    where = {key: f"{key} in {config}" for key in cluster_raw} | {key: serve.flag(key) for key in given}
    opts, server_where = _server_options(server_argv, {k: v for k, v in raw.items() if k not in CLUSTER_KEYS}, config)
    launch = ClusterLaunch(cluster, opts, {**server_where, **where})
    check_launch(launch)
    return launch


def _server_options(argv: list[str], raw: dict, config: str | None) -> tuple[ServeOptions, dict[str, str]]:
    """serve.load_options over the YAML's single-server keys (a copy without the cluster keys), errors naming the
    cluster YAML."""
    if config is None:
        return serve.load_options(argv)
    with tempfile.TemporaryDirectory(prefix="bdlora-cluster-") as tmp:
        part = Path(tmp) / "server.yaml"
        part.write_text(yaml.safe_dump(raw))
        try:
            opts, where = serve.load_options([*argv, "--config", str(part)])
        except ConfigError as err:
            raise ConfigError(str(err).replace(str(part), config)) from None
    return opts, {key: text.replace(str(part), config) for key, text in where.items()}


def check_launch(launch: ClusterLaunch) -> None:
    """The single server's checks (for one replica's TP group) and the cluster keys' own."""
    c, where = launch.cluster, launch.where

    def name(key: str) -> str:
        return where.get(key, serve.flag(key))

    serve.check_options(launch.server, where, launch.tp)
    for key in ("replicas", "min_replicas", "max_replicas", "num_cpus"):
        value = getattr(c, key)
        if value is not None and value < 1:
            raise ConfigError(f"{name(key)} must be >= 1, got {value}")
    if c.min_replicas is not None and c.max_replicas is None:
        raise ConfigError(f"{name('min_replicas')} needs max-replicas (max_replicas), which turns autoscaling on")
    if c.max_replicas is not None and c.max_replicas < (c.min_replicas or 1):
        raise ConfigError(f"{name('max_replicas')} ({c.max_replicas}) is below min-replicas ({c.min_replicas or 1})")
    for key in ("target_ongoing_requests", "retry_window_s", "health_check_period_s", "startup_timeout_s",
                "look_back_period_s"):
        if not getattr(c, key) > 0:
            raise ConfigError(f"{name(key)} must be > 0, got {getattr(c, key)}")
    for key in ("upscale_delay_s", "downscale_delay_s", "replica_cpus"):
        if getattr(c, key) < 0:
            raise ConfigError(f"{name(key)} must be >= 0, got {getattr(c, key)}")
    if c.replica_gpus is not None and c.replica_gpus not in (0, launch.tp):
        raise ConfigError(f"{name('replica_gpus')} must be 0 (CPU) or tp ({launch.tp}: one GPU per TP rank), got "
                          f"{c.replica_gpus}")
    if c.routing not in ROUTINGS:
        raise ConfigError(f"{name('routing')} must be one of {', '.join(ROUTINGS)}, got {c.routing!r}")


def replica_settings(opts: ServeOptions, tp: int) -> dict:
    """The single server's --config for every replica: the given settings with absolute paths; the address is the
    replica's own (127.0.0.1, a free port) and the API key travels in its environment."""
    settings = {f.name: getattr(opts, f.name) for f in fields(ServeOptions)
                if getattr(opts, f.name) is not None and f.name not in ("host", "port", "api_key")}
    settings["tp"] = tp
    if opts.megatron_dir is not None:
        settings["megatron_dir"] = os.path.abspath(opts.megatron_dir)
    settings["adapters"] = {name: os.path.abspath(path) for name, path in (opts.adapters or {}).items()}
    if opts.lora_root:
        settings["lora_root"] = [os.path.abspath(os.path.expanduser(root)) for root in opts.lora_root]
    return settings
