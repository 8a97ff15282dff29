"""The ingress's /metrics: every replica's engine metrics with a `replica` label, and the cluster's own counts.

Each engine exposes the single server's bdlora_* / vllm:* families (routes.py); they are parsed and re-emitted
with one extra label rather than concatenated, so that a family appears once, with one HELP and TYPE, as
Prometheus requires.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from megatron_bdlora.cluster.messages import ReplicaReport

REPLICA_LABEL = "replica"
CONTENT_TYPE = CONTENT_TYPE_LATEST


def labelled_families(reports: Iterable[ReplicaReport]) -> list[Metric]:
    """The replicas' metric families merged by name, each sample labelled with its replica."""
    merged: dict[str, Metric] = {}
    for report in reports:
        for family in text_string_to_metric_families(report.metrics):
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            into.samples.extend(s._replace(labels={**s.labels, REPLICA_LABEL: report.replica})
                                for s in family.samples)
    return list(merged.values())


class _Snapshot(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def cluster_families(reports: list[ReplicaReport], retries: int, unanswered: int,
                     rejected: Mapping[str, int]) -> list[Metric]:
    """The ingress's own view: replicas by health, retries made, requests given up after the retry window, requests
    refused before any replica (API key, body size)."""
    replicas = GaugeMetricFamily("bdlora_cluster_replicas", "Engine replicas reporting, by health", labels=["state"])
    healthy = sum(r.healthy for r in reports)
    replicas.add_metric(["healthy"], healthy)
    replicas.add_metric(["unhealthy"], len(reports) - healthy)
    refused = CounterMetricFamily("bdlora_cluster_requests_rejected", "Requests refused at the ingress, by reason",
                                  labels=["reason"])
    for reason, count in sorted(rejected.items()):
        refused.add_metric([reason], count)
    return [replicas,
            CounterMetricFamily("bdlora_cluster_retries", "Requests sent again to a replica after one gave no answer",
                                value=retries),
            CounterMetricFamily("bdlora_cluster_unanswered", "Requests answered 503 because no replica answered "
                                "within the retry window", value=unanswered),
            refused]


def exposition(metrics: list[Metric]) -> bytes:
    """Prometheus text format of the given families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return generate_latest(registry)
