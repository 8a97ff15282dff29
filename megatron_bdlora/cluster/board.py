"""The replicas' latest reports, kept for the ingress's /health and /metrics.

Replicas push rather than the ingress pulling because Ray Serve routes a call to one replica of a deployment and
has no call to all of them; a report older than `stale_after_s` is a replica that is gone (killed, replaced) and is
left out, and a replica that stops cleanly removes its own.
"""

from __future__ import annotations

import time

from megatron_bdlora.cluster.messages import ReplicaReport


class ReplicaBoard:
    """A one-replica Serve deployment holding the newest ReplicaReport of each engine replica."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.reports: dict[str, ReplicaReport] = {}

    def report(self, report: ReplicaReport) -> None:
        self.reports[report.replica] = report

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def current(self) -> list[ReplicaReport]:
        """Reports of the replicas alive now (fresh enough), sorted by replica id."""
        now = time.time()
        for name in [n for n, r in self.reports.items() if now - r.sent_at > self.stale_after_s]:
            del self.reports[name]
        return sorted(self.reports.values(), key=lambda r: r.replica)
