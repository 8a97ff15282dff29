"""The prepared GPU check: one short run that proves kernels, serving engine (eager and CUDA graphs), serving speed
and training on a real GPU, written as JSON and Markdown (tools/gpu_check.py is its command line).

A GPU machine is lent rarely and briefly, so the check is one script with a time budget: each part gets a share
of what is left, stops early keeping what it measured, and is reported as skipped (with why) when it would not
fit. `--smoke` runs the same code at tiny sizes on CPU (kernels in Triton's interpreter, no graphs) inside the
test suite, so the script cannot rot between GPU windows. Exit status 1 on any mismatch or crashed part.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_bdlora.atomic import atomic_write_text
from megatron_bdlora.bench.environment import code_version, machine, package_versions
from megatron_bdlora.bench.report import PartResult, run_part

DEFAULT_BUDGET_S = 420.0  # of the 8 minutes a GPU window allows for the run, machine start and copies aside


@dataclass(frozen=True)
class Part:
    """One part of the check: its share of the budget and the least time it needs to be worth starting."""

    name: str
    share: float  # of the whole budget (capped by what is left when it starts)
    min_s: float
    run: Callable[[bool, float], PartResult]  # (smoke, budget_s) -> result


# lazy (each part's module, imported when the part runs): tools/gpu_check.py sets TRITON_INTERPRET after importing
# this module, before triton (which megatron-core imports too) is first imported; and a part that fails to import is
# an error of that part, not of the whole check
def _kernels(smoke: bool, budget_s: float) -> PartResult:
    from megatron_bdlora.bench.kernels import gpu_check_part

    return gpu_check_part(smoke, budget_s)


def _training(smoke: bool, budget_s: float) -> PartResult:
    from megatron_bdlora.bench.gpu_training import gpu_check_part

    return gpu_check_part(smoke, budget_s)


def _exactness(cuda_graphs: bool) -> Callable[[bool, float], PartResult]:
    def run(smoke: bool, budget_s: float) -> PartResult:
        from megatron_bdlora.bench.gpu_serving import exactness_part

        if cuda_graphs and not torch.cuda.is_available():
            return PartResult("engine_exactness_graphs", "skipped", "CUDA graphs need a GPU")
        return exactness_part(smoke, budget_s, cuda_graphs=cuda_graphs)

    return run


def _speed(smoke: bool, budget_s: float) -> PartResult:
    from megatron_bdlora.bench.gpu_serving import speed_part

    return speed_part(smoke, budget_s, graphs_modes=(False, True) if torch.cuda.is_available() else (False,))


def _serve_cli(smoke: bool, budget_s: float) -> PartResult:
    from megatron_bdlora.bench.gpu_serve_cli import gpu_check_part

    return gpu_check_part(smoke, budget_s)


PARTS = (
    Part("kernels", 0.20, 20, _kernels),
    Part("engine_exactness", 0.12, 20, _exactness(False)),
    Part("engine_exactness_graphs", 0.12, 20, _exactness(True)),
    Part("training", 0.12, 20, _training),
    Part("serve_cli", 0.10, 30, _serve_cli),
    Part("serving_speed", 0.34, 40, _speed),
)


def attention_path() -> str:
    """Which paged attention megatron's engine runs here (flash-attn, or our torch stand-in)."""
    try:  # lazy, inside the try: a broken megatron-core or flash-attn is reported here, not fatal
        from megatron_bdlora.inference.cpu_fallbacks import attention_path_here
    except ImportError as err:
        return f"unknown ({err})"
    return attention_path_here()


def environment(commit: str | None) -> dict:
    """Machine, versions, code and the paths this run takes."""
    return dict(machine=machine(), packages=package_versions(), code=code_version(commit), attention=attention_path(),
                tf32_for_exactness="off", lora_backend=os.environ.get("MEGATRON_BDLORA_LORA_BACKEND", "auto"))


def run_check(out_dir: Path, smoke: bool, budget_s: float, commit: str | None = None,
              only: tuple[str, ...] | None = None) -> int:
    """Run every part within `budget_s`, write gpu_check.json / gpu_check.md under out_dir; the exit status."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment(commit)
    results: list[PartResult] = []
    parts = [part for part in PARTS if not only or part.name in only]
    whole = sum(part.share for part in parts)  # a subset shares the whole budget
    for part in parts:
        left = budget_s - (time.perf_counter() - start)
        share = min(left, part.share / whole * budget_s)
        print(f"[gpu_check] {part.name}: up to {share:.0f} s ({left:.0f} s left)", flush=True)
        result = run_part(part.name, lambda p=part, s=share: p.run(smoke, s), share, part.min_s)
        print(f"[gpu_check] {part.name}: {result.status} in {result.seconds:.0f} s {result.why}", flush=True)
        results.append(result)
        _release_device_memory()
        # keep what ran if a later part hangs
        _write(out_dir, env, results, smoke, budget_s, time.perf_counter() - start)
    failed = [r.name for r in results if r.status in ("mismatch", "error")]
    print(f"[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'OK'} "
          f"({time.perf_counter() - start:.0f} s); wrote {out_dir / 'gpu_check.json'} and gpu_check.md", flush=True)
    return 1 if failed else 0


def _release_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _write(out_dir: Path, env: dict, results: list[PartResult], smoke: bool, budget_s: float, wall_s: float) -> None:
    report = dict(smoke=smoke, budget_s=budget_s, wall_s=round(wall_s, 1), environment=env,
                  parts=[r.to_json() for r in results])
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / "gpu_check.md", render_markdown(env, results, smoke, wall_s))


def render_markdown(env: dict, results: list[PartResult], smoke: bool, wall_s: float) -> str:
    """The report as Markdown: environment, a status line per part, then each part's own tables."""
    m, pk, code = env["machine"], env["packages"], env["code"]
    lines = [
        f"# GPU check{' (smoke, CPU-sized)' if smoke else ''}",
        "",
        f"- date: {m['date']}; commit: {code.get('commit')}; wall: {wall_s:.0f} s",
        f"- GPU: {m.get('gpu') or 'none'}"
        + (f" ({m.get('gpu_memory_gib')} GiB, {m.get('sms')} SMs, CUDA {m.get('cuda')}, "
           f"sm_{m.get('capability', '').replace('.', '')})" if m.get("gpu") else ""),
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
        f"- attention path: {env['attention']}; LoRA backend: {env['lora_backend']}; TF32 off for exactness checks",
        "",
        "| part | status | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.why.replace('|', '/')} |" for r in results]
    for r in results:
        if r.markdown:
            lines += ["", f"## {r.name}", "", r.markdown.rstrip()]
        if r.status == "error" and r.data.get("traceback"):
            lines += ["", f"## {r.name}: traceback", "", "```text", r.data["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"
