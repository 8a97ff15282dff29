"""The CPU serving benchmark on one TP rank: every system's loop built once, warmed up, then the workload replayed
against wall time (rank 0 submits by the arrival schedule; every rank steps in lockstep).

`serve_worker` is what tools/bench_serving.py runs on its spawned gloo ranks (they unpickle it from this module).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_bdlora.bench.serving_setup import PEFT
from megatron_bdlora.bench.workload import PeftBatcher
from megatron_bdlora.inference.requests import GenerationParams
from megatron_bdlora.inference.serving_config import ServingConfig

# known-harmless noise from every rank (CPU build without Transformer Engine; megatron's older c10d names)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class _StepProbe:
    """Forward pre-hook on the served model: counts engine forwards and remembers whether the last one decoded only."""

    def __init__(self, loop: Any) -> None:
        self.ctx = loop.engine.context
        self.forwards = 0
        self.decode_forwards = 0
        self.last_decode_only: bool | None = None
        loop.model.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.forwards += 1
        self.last_decode_only = bool(self.ctx.is_decode_only())
        self.decode_forwards += self.last_decode_only


def _all_done(done: bool, tp: int) -> bool:
    """Every rank stops after the same step: rank 0's verdict (followers pass True), all-reduced."""
    if tp == 1:
        return done
    flag = torch.tensor([int(done)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def replay(loop: Any, probe: _StepProbe, info: Any, workload: list[dict], adapters: list[str | None],
           count: bool = False, bar: Any = None, sampling: dict | None = None) -> dict | None:
    """Run the workload through the loop (rank 0 submits at the arrival times; every rank steps in lockstep).

    adapters[i]: the adapter of request i (None: the base model). Rank 0 returns per-request times (s from the
    start), tokens, engine steps, its adapter reads (latency of each) and the loop steps in which a request waited
    for one, and, with `count`, the collectives of the first decode-only step. `sampling`: extra GenerationParams
    fields of every request (--logprobs, --prompt-logprobs).
    """
    forwards0, decode0 = probe.forwards, probe.decode_forwards
    reads0, waited0 = loop.read_times.snapshot()[0], loop.counters["steps_waiting_for_adapter"]
    loop.count_collectives = count
    decode_collectives = None
    if info.rank != 0:
        while True:
            loop.step()
            if _all_done(True, info.tp_size):
                break
        loop.count_collectives = False
        return None
    n = len(workload)
    recs = [dict(arrival=r["arrival_s"], first=None, finish=None, tokens=[]) for r in workload]
    queues: dict[int, Any] = {}
    decode_step_s: list[float] = []  # wall time of each decode-only loop step
    submitted = finished = 0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        while submitted < n and workload[submitted]["arrival_s"] <= now:  # the workload is sorted by arrival
            r = workload[submitted]
            params = GenerationParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True,
                                      **(sampling or {}))
            queues[submitted] = loop.submit(r["prompt_ids"], adapters[submitted], params)[1]
            submitted += 1
        if finished == submitted < n:  # idle until the next arrival (the followers wait in the step's broadcast)
            time.sleep(max(0.0, workload[submitted]["arrival_s"] - now))
            continue
        probe.last_decode_only = None
        before = time.perf_counter()
        loop.step(wait=True)  # work is outstanding: waits only a moment, and only while adapter reads are in flight
        t = time.perf_counter() - t0
        if probe.last_decode_only:
            decode_step_s.append(t0 + t - before)
        if count and decode_collectives is None and probe.last_decode_only:
            decode_collectives = dict(loop.step_collectives)
        for i in list(queues):
            q = queues[i]
            while not q.empty():
                ev = q.get()
                if ev.token_ids and recs[i]["first"] is None:
                    recs[i]["first"] = t
                recs[i]["tokens"] += ev.token_ids
                if ev.finished:
                    if ev.finish_reason != "length":
                        raise RuntimeError(f"request {i} finished with {ev.finish_reason}: {ev.error}")
                    recs[i]["finish"] = t
                    del queues[i]
                    finished += 1
                    if bar is not None:
                        bar.update(1)
                    break
        if _all_done(finished == n, info.tp_size):
            break
    loop.count_collectives = False
    reads, _, _, recent = loop.read_times.snapshot()
    return dict(requests=recs, engine_steps=probe.forwards - forwards0,
                decode_steps=probe.decode_forwards - decode0, decode_collectives=decode_collectives,
                decode_step_s=decode_step_s, adapter_read_s=recent[len(recent) - (reads - reads0):],
                steps_waiting_for_adapter=loop.counters["steps_waiting_for_adapter"] - waited0)


def warmup_requests(workload: list[dict], count: int, every_adapter: bool = True) -> list[dict]:
    """The first `count` requests plus, if `every_adapter`, the first request of every adapter not among them (so that
    every adapter is in its slot before timing), all at t=0 with at most 6 new tokens."""
    chosen = list(workload[:count])
    seen = {c["adapter"] for c in chosen}
    for r in workload[count:] if every_adapter else ():
        if r["adapter"] not in seen:
            chosen.append(r)
            seen.add(r["adapter"])
    return [dict(r, arrival_s=0.0, output_len=min(r["output_len"], 6)) for r in chosen]


def serve_worker(info: Any, spec: dict, workload: list[dict], adapter_dirs: dict[str, str]) -> dict | None:
    """On one TP rank: build a loop per mode, warm each system up, replay the workload --repeats times."""
    # lazy: megatron-core (seconds, warnings on import) loads in the ranks only; tools/bench_serving.py imports this
    # module before it parses its flags
    from megatron_bdlora.inference.serving_loop import ServingLoop

    torch.set_num_threads(spec["threads"])
    specs, names = spec["systems"], spec["names"]
    systems = list(specs)
    loops, probes = {}, {}
    for mode in dict.fromkeys(s["mode"] for s in specs.values() if s["mode"]):
        # by default every adapter its systems serve stays resident in its own slot: no adapter loads while timing
        variants = list(dict.fromkeys(s["variant"] for s in specs.values() if s["mode"] == mode and s["variant"]))
        served = {n: adapter_dirs[n] for v in variants for n in names[v]}
        per_variant = max(1, len(variants))
        config = ServingConfig(megatron_dir=Path(spec["megatron_dir"]), mode=mode, adapters=served,
                               max_loras=spec["max_loras"] * per_variant,
                               max_cpu_loras=spec["max_cpu_loras"] and spec["max_cpu_loras"] * per_variant,
                               max_lora_rank=max([spec["ranks"][v] for v in variants], default=spec["adapter_rank"]),
                               **spec["engine"])
        loops[mode] = ServingLoop.create(config, info)
        probes[mode] = _StepProbe(loops[mode])
    peft = None
    if PEFT in systems:
        peft = PeftBatcher(Path(spec["hf_dir"]), spec["peft_dirs"], spec["engine"]["max_num_seqs"])

    def run(system: str, requests: list[dict], count: bool = False, bar: Any = None) -> dict | None:
        s = specs[system]
        adapters = [names[s["variant"]][r["adapter"]] if s["variant"] else None for r in requests]
        if system == PEFT:
            return peft.replay(requests, adapters, bar)
        return replay(loops[s["mode"]], probes[s["mode"]], info, requests, adapters, count, bar, spec.get("sampling"))

    lead = info.rank == 0
    warm = warmup_requests(workload, spec["warmup"], every_adapter=spec["all_adapters_cached"])
    out: dict[str, dict] = {s: dict(repeats=[]) for s in systems}
    for s in systems:  # first-step costs, and the collectives of a decode-only step (untimed)
        result = run(s, warm, count=True)
        if lead:
            out[s]["decode_collectives"] = result["decode_collectives"]
    total = spec["repeats"] * len(systems) * len(workload)
    with tqdm(total=total, desc="serving", unit="req", disable=None if lead else True, file=sys.stderr) as bar:
        for rep in range(spec["repeats"]):
            order = systems[rep % len(systems):] + systems[: rep % len(systems)]  # rotate: drift hits all alike
            for s in order:
                bar.set_postfix_str(s)
                result = run(s, workload, bar=bar)
                if lead:
                    out[s]["repeats"].append(result)
    if spec.get("profile"):  # one more untimed replay per system under torch.profiler: where a step's time goes
        for s in systems:
            if s == PEFT:
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = run(s, workload)
            if lead:
                out[s]["profile"] = profile_summary(prof, result["engine_steps"])
    return out if lead else None


def profile_summary(prof: Any, engine_steps: int, top: int = 12) -> dict:
    """Rank 0's top ops by self CPU time over one profiled replay: ms per engine step and share of the total."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    return dict(
        engine_steps=engine_steps,
        self_cpu_ms_per_step=total_ms / engine_steps,
        ops=[dict(name=e.key, calls_per_step=e.count / engine_steps,
                  ms_per_step=e.self_cpu_time_total / 1e3 / engine_steps,
                  share=e.self_cpu_time_total / 1e3 / total_ms) for e in events[:top]],
    )
