"""Adapter-aware routing against Ray's default routing, on one seeded many-adapter workload (tools/bench_cluster.py).

The workload is the serving benchmark's (megatron_bdlora.bench.serving_setup.make_workload: Zipf adapter
popularity, Poisson or all-at-once arrivals, seeded prompts of token ids), over more adapters than one replica has
device slots. Each routing gets a fresh cluster (the same config); before the timed replay, each adapter's first
request is sent alone, one adapter after another (a cluster in production has long since seen its adapters; sent
all at once, an adapter's first requests can reach two replicas before Serve's router has heard which replica
loaded it, and the count would measure that start-up race instead of routing). The requests are streamed
completions (greedy, ignore_eos, usage in the last event), and what is measured comes from the client (tokens/s
over the whole replay, time to first token) and from the ingress's /metrics (adapter loads and evictions per
replica, which is what routing changes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from megatron_bdlora.bench.results import write_json
from megatron_bdlora.bench.serving_setup import make_workload
from megatron_bdlora.bench.tables import fixed_width_table
from megatron_bdlora.bench.workload import percentile, write_random_adapter
from megatron_bdlora.cluster.options import ROUTINGS, ClusterLaunch, load_launch
from megatron_bdlora.config import LoRASettings

DEFAULT_CONFIG = "configs/serve-cluster-smollm2.yaml"
PER_REPLICA = {"loads": "bdlora_adapter_loads", "evictions": "bdlora_adapter_evictions",
               "generated_tokens": "bdlora_generated_tokens"}


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's flags, and the rest: serve_cluster flags (--max-loras 2, --replicas 2, ...)."""
    p = argparse.ArgumentParser(prog="python tools/bench_cluster.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the cluster's YAML (default {DEFAULT_CONFIG}); any "
                   "other flag of python -m megatron_bdlora.serve_cluster may follow and overrides it")
    p.add_argument("--routings", default=",".join(ROUTINGS), help="routings to compare, in order (default "
                   "adapter,default)")
    p.add_argument("--adapter-dir", type=Path, default=None,
                   help="where the random adapters are written (default: a temporary directory)")
    p.add_argument("--adapter-rank", type=int, default=8, help="rank of the random adapters (default 8)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=64, help="requests in the workload (default 64)")
    w.add_argument("--num-adapters", type=int, default=4,
                   help="adapters (default 4: more than one replica's device slots with --max-loras 2)")
    w.add_argument("--popularity-alpha", type=float, default=1.0,
                   help="Zipf popularity: adapter k is drawn with weight 1 / (k + 1)^alpha (default 1.0)")
    w.add_argument("--arrival", choices=("poisson", "all"), default="poisson",
                   help="poisson: arrivals at --rate per second; all: every request at once (default poisson)")
    w.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (default 4)")
    w.add_argument("--prompt-len", type=_pair, default=(8, 24), metavar="MIN,MAX",
                   help="prompt tokens (default 8,24)")
    w.add_argument("--output-len", type=_pair, default=(8, 16), metavar="MIN,MAX",
                   help="generated tokens (default 8,16)")
    w.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    args, rest = p.parse_known_args(argv)
    routings = args.routings.split(",")
    if not routings or any(r not in ROUTINGS for r in routings):
        p.error(f"--routings: a comma-separated list of {', '.join(ROUTINGS)}, got {args.routings!r}")
    if args.num_adapters < 1 or args.num_requests < 1:
        p.error("--num-adapters and --num-requests must be >= 1")
    args.routings = routings
    return args, rest


def base_hf_config(launch: ClusterLaunch) -> dict:
    """The base model's config.json (the embedded SmolLM2's without --megatron-dir)."""
    from megatron_bdlora.base_models import EMBEDDED, resolve_hf_base

    base = Path(launch.server.megatron_dir) if launch.server.megatron_dir else resolve_hf_base(EMBEDDED)
    return json.loads((base / "config.json").read_text())


def write_adapters(root: Path, launch: ClusterLaunch, count: int, rank: int) -> dict[str, str]:
    """`count` random native BD adapters (nblocks = tp) for the launch's base; name -> directory."""
    hf_config, tp = base_hf_config(launch), launch.tp
    settings = LoRASettings(rank=rank * tp, alpha=2 * rank * tp, nblocks=tp)
    return {f"bench-{k}": write_random_adapter(root / f"bench-{k}", hf_config, settings, tp, seed=1000 + k)
            for k in range(count)}


async def _one(session: aiohttp.ClientSession, url: str, t0: float, request: dict, model: str) -> dict:
    await asyncio.sleep(max(0.0, t0 + request["arrival_s"] - time.perf_counter()))
    body = {"model": model, "prompt": request["prompt_ids"], "max_tokens": request["output_len"], "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent, first, tokens, error = time.perf_counter(), None, 0, None
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event or resp.status != 200:
                error = event.get("error", event)
            elif event.get("choices") and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        if resp.status != 200:
            error = error or resp.status
    return {"ttft_s": None if first is None else first - sent, "tokens": tokens, "error": error}


async def replay(url: str, workload: list[dict], names: list[str]) -> tuple[list[dict], float]:
    """Every request at its arrival time, concurrently; (results in workload order, wall seconds)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(session, url, t0, r, names[r["adapter"]]) for r in workload))
        return list(results), time.perf_counter() - t0


async def per_replica(url: str) -> dict[str, dict[str, float]]:
    """Adapter loads, evictions and generated tokens of each replica, from the ingress's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    names = {v: k for k, v in PER_REPLICA.items()}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name in names and "replica" in sample.labels and sample.name.endswith("_total"):
                out.setdefault(sample.labels["replica"], {})[names[family.name]] = sample.value
    return out


async def first_requests(url: str, workload: list[dict], names: list[str], settle_s: float) -> None:
    """Each adapter's first request of the workload alone, in order of first use, `settle_s` apart (Serve's router
    learns a replica's adapters from its reports)."""
    firsts = {r["adapter"]: r for r in workload}.values()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        for request in sorted(firsts, key=lambda r: r["arrival_s"]):
            result = await _one(session, url, time.perf_counter(), {**request, "arrival_s": 0.0},
                                names[request["adapter"]])
            if result["error"] is not None:
                raise RuntimeError(f"first request for adapter {names[request['adapter']]}: {result['error']}")
            await asyncio.sleep(settle_s)


def measure(launch: ClusterLaunch, workload: list[dict], names: list[str], settle_s: float = 3.0) -> dict:
    """One fresh cluster with this launch's routing, each adapter's first request alone, the workload replayed
    once, and what it cost (loads and evictions over the cluster's whole life, first requests included)."""
    from megatron_bdlora.cluster.runtime import running_cluster

    with running_cluster(launch) as url:
        asyncio.run(first_requests(url, workload, names, settle_s / 3))
        results, wall = asyncio.run(replay(url, workload, names))
        time.sleep(settle_s)  # replicas report every 0.5 s
        replicas = asyncio.run(per_replica(url))
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {
        "routing": launch.cluster.routing,
        "requests": len(results),
        "failed": sum(r["error"] is not None for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "wall_s": wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50) if ttfts else None,
        "ttft_p90_ms": 1000 * percentile(ttfts, 90) if ttfts else None,
        "adapter_loads": sum(r.get("loads", 0) for r in replicas.values()),
        "adapter_evictions": sum(r.get("evictions", 0) for r in replicas.values()),
        "replicas": replicas,
    }


def table(rows: list[dict]) -> str:
    head = ("routing", "tokens/s", "TTFT p50 ms", "TTFT p90 ms", "loads", "evictions", "loads per replica", "failed")
    body = [(r["routing"], f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p90_ms']:.0f}",
             f"{r['adapter_loads']:.0f}", f"{r['adapter_evictions']:.0f}",
             " ".join(f"{v.get('loads', 0):.0f}" for _, v in sorted(r["replicas"].items())), str(r["failed"]))
            for r in rows]
    return fixed_width_table(head, body)


def run(argv: list[str] | None = None) -> dict:
    """Write the adapters, replay the workload under each routing, print the table; returns what --json holds."""
    args, cluster_argv = parse_args(argv)
    launch = load_launch(["--config", args.config, "--port", "0", *cluster_argv])  # a free port unless --port
    with tempfile.TemporaryDirectory(prefix="bdlora-bench-cluster-") as tmp:
        root = args.adapter_dir or Path(tmp)
        adapters = write_adapters(root, launch, args.num_adapters, args.adapter_rank)
        launch.server.adapters = {**(launch.server.adapters or {}), **adapters}
        vocab = base_hf_config(launch)["vocab_size"]
        workload = make_workload(args, vocab)
        rows = [measure(replace(launch, cluster=replace(launch.cluster, routing=routing)), workload, list(adapters))
                for routing in args.routings]
    print(table(rows))
    result = {"workload": {k: v for k, v in vars(args).items() if k not in ("json", "adapter_dir")},
              "cluster_argv": cluster_argv, "rows": rows}
    by = {r["routing"]: r for r in rows}
    if {"adapter", "default"} <= by.keys() and by["adapter"]["adapter_loads"]:
        result["default_over_adapter_loads"] = by["default"]["adapter_loads"] / by["adapter"]["adapter_loads"]
        print(f"adapter loads, default / adapter-aware routing: {result['default_over_adapter_loads']:.2f}x")
    if args.json is not None:
        write_json(args.json, result)
    return result
