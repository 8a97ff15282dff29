"""tools/bench_cluster.py on the shipped SmolLM2 cluster (2 replicas, --max-loras 2) and 4 adapters: adapter-aware
routing loads each adapter about once, Ray's default routing at least twice as often, and no request fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cluster_helpers import ROOT

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]


def test_adapter_aware_routing_loads_adapters_at_least_2x_less_often_than_default_routing(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "tools/bench_cluster.py", "--max-loras", "2", "--num-adapters", "4", "--num-requests", "48",
           "--rate", "4", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["routing"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {"adapter", "default"}
    assert all(r["failed"] == 0 and r["requests"] == 48 and len(r["replicas"]) == 2 for r in rows.values())
    assert rows["adapter"]["adapter_loads"] <= 1.5 * 4, rows["adapter"]
    assert rows["default"]["adapter_loads"] >= 2 * rows["adapter"]["adapter_loads"], rows
    assert "adapter loads, default / adapter-aware routing" in run.stdout
