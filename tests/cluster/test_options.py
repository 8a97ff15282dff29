"""The cluster's settings: one YAML with the single server's keys and the cluster's, flags over it, errors naming
the cluster YAML and its key; the shipped configs; what each replica's single server is started with."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cluster_helpers import ROOT, SMOLLM2_CLUSTER

from megatron_bdlora.cluster.app import adapters_per_replica, autoscaling_config
from megatron_bdlora.cluster.options import CLUSTER_KEYS, ClusterOptions, load_launch, replica_settings
from megatron_bdlora.config_file import ConfigError, build_section
from megatron_bdlora.serve import ServeOptions


def write(tmp_path: Path, settings: dict) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_shipped_smollm2_config_is_two_tp1_replicas_routed_by_adapter_and_flags_override_it(tmp_path):
    (tmp_path / "a0").mkdir()
    launch = load_launch(["--config", str(SMOLLM2_CLUSTER), "--adapter", f"a0={tmp_path / 'a0'}", "--max-loras", "3",
                          "--replicas", "3", "--ray-address", "auto"])
    assert (launch.cluster.replicas, launch.tp, launch.cluster.routing) == (3, 1, "adapter")
    assert launch.cluster.ray_address == "auto" and launch.server.max_loras == 3
    assert launch.server.mode == "block_diagonal" and launch.server.adapters == {"a0": str(tmp_path / "a0")}
    assert adapters_per_replica(launch) == 3 and autoscaling_config(launch) is None
    assert load_launch(["--config", str(SMOLLM2_CLUSTER)]).cluster.replicas == 2


def test_every_key_of_the_shipped_cluster_configs_is_a_server_or_cluster_key():
    for path in sorted((ROOT / "configs").glob("serve-cluster-*.yaml")):
        raw = yaml.safe_load(path.read_text())
        build_section(ClusterOptions, {k: v for k, v in raw.items() if k in CLUSTER_KEYS}, "")
        build_section(ServeOptions, {k: v for k, v in raw.items() if k not in CLUSTER_KEYS}, "")


def test_autoscaling_keys_become_serves_autoscaling_config(tmp_path):
    config = write(tmp_path, {"mode": "block_diagonal", "min_replicas": 1, "max_replicas": 2,
                              "target_ongoing_requests": 1.5, "upscale_delay_s": 2, "downscale_delay_s": 8,
                              "look_back_period_s": 3})
    assert autoscaling_config(load_launch(["--config", config])) == {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1.5, "upscale_delay_s": 2.0,
        "downscale_delay_s": 8.0, "look_back_period_s": 3.0}


@pytest.mark.parametrize("settings, flags, message", [
    ({"mode": "block_diagonal", "replica": 2}, [], "unknown config key(s) ['replica']"),
    ({"mode": "block_diagonal", "max_loras": 0}, [], "max_loras in {config} must be >= 1, got 0"),
    ({"mode": "block_diagonal", "replicas": "two"}, [], "replicas must be int, got 'two'"),
    ({"mode": "block_diagonal", "replicas": 0}, [], "replicas in {config} must be >= 1, got 0"),
    ({"mode": "block_diagonal", "min_replicas": 2}, [], "min_replicas in {config} needs max-replicas"),
    ({"mode": "block_diagonal"}, ["--max-replicas", "1", "--min-replicas", "2"], "--max-replicas (1) is below"),
    ({"mode": "block_diagonal", "tp": 2, "replica_gpus": 1}, [], "replica_gpus in {config} must be 0 (CPU) or tp (2"),
    ({"mode": "block_diagonal", "retry_window_s": 0}, [], "retry_window_s in {config} must be > 0"),
    ({"max_loras": 2}, [], "--mode is required"),
])
def test_bad_settings_are_refused_naming_the_cluster_yaml_key_or_flag(tmp_path, settings, flags, message):
    config = write(tmp_path, settings)
    with pytest.raises(ConfigError) as err:
        load_launch(["--config", config, *flags])
    assert message.format(config=config) in str(err.value)
    assert "bdlora-cluster-" not in str(err.value), "the message names a temporary file, not the user's YAML"


def test_replicas_start_their_server_with_absolute_paths_and_without_address_or_key(tmp_path, monkeypatch):
    (tmp_path / "ad").mkdir()
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path, {"mode": "slora", "tp": 2, "adapters": {"x": "ad"}, "api_key": "secret",
                              "enable_lora_runtime_updating": True, "lora_root": ".", "replicas": 2})
    launch = load_launch(["--config", config, "--port", "9000"])
    settings = replica_settings(launch.server, launch.tp)
    assert settings["adapters"] == {"x": str(tmp_path / "ad")} and settings["lora_root"] == [str(tmp_path)]
    assert settings["tp"] == 2 and settings["mode"] == "slora" and settings["enable_lora_runtime_updating"]
    assert not {"host", "port", "api_key", *CLUSTER_KEYS} & settings.keys()
    build_section(ServeOptions, settings, "")  # a config the single server accepts
