"""The serving loop on a GPU: two parts of the prepared GPU check (megatron_bdlora/bench/gpu_check.py).

1. `exactness_part`: one mixed stream through `ServingLoop` at TP=1 in float32 with TF32 off: requests for BD
   adapters of different ranks and block counts (1, 2, 4, 8) and for the base model, arriving while others run,
   greedy, prompts long enough for chunked prefill. Each request must equal the same request alone with its adapter
   merged into the base weights and the whole sequence recomputed every step (no KV cache, megatron's own
   attention): tokens equal, logits within 1e-4 of their scale. This is tests/test_serving_loop.py's check at
   Llama-3.1-8B layer widths on the device where the paged attention, the Triton LoRA kernels and (cuda_graphs)
   megatron's captured decode steps actually run.
2. `speed_part`: decode tokens/s and decode step time (median, p10-p90) in bf16 at Llama-3.1-8B widths for BD
   (4 adapters mixed in every batch), replicated (the same adapters converted exactly), no adapter, and
   transformers + PEFT mixed-adapter batching, at batch 1-64, eager and under CUDA graphs; and the LoRA share of a
   BD decode step from the torch profiler.

Everything is made in memory (random base weights drawn on the device, a word-level tokenizer, adapters written to
a temporary directory): the GPU machine has no network and no model files. smoke=True runs the same code on CPU at
tiny widths inside the test suite, so that the parts cannot rot between GPU windows.
"""

from __future__ import annotations

import contextlib
import gc
import random
import statistics
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from megatron.core.transformer.cuda_graphs import delete_cuda_graphs
from torch.autograd import DeviceType

from megatron_bdlora.bench.report import PartResult
from megatron_bdlora.bench.workload import (
    PEFT_BASE,
    PeftBatcher,
    compare_tokens,
    hf_llama,
    percentile,
    random_adapter_factors,
    random_base_state,
    save_adapter,
    single_process_group,
    word_tokenizer,
)
from megatron_bdlora.checkpoint.peft import export_peft_directory
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.inference.adapter_slots import serving_settings
from megatron_bdlora.inference.requests import GenerationParams
from megatron_bdlora.inference.serving_config import ServingConfig
from megatron_bdlora.inference.serving_loop import ServingLoop
from megatron_bdlora.layers import LoRAParallelLinear
from megatron_bdlora.model import build_model, load_base_state_dict, load_full_adapter

LLAMA_8B_WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
TINY_WIDTHS = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4)
# the served base model's name (ServingConfig.megatron_dir is not read: weights are in memory)
BASE_NAME = "random-llama"
LOGIT_TOLERANCE = 1e-4  # max |served - reference| / max |reference| over a request's steps
STEP_RANGE, LORA_RANGE = "bdlora::engine_step", "bdlora::lora"  # profiler ranges of the speed part
LORA_KERNELS = ("lora_shrink_kernel", "lora_expand_kernel")  # megatron_bdlora/kernels/segment_lora.py (the GPU path's)


def llama_config(widths: dict, layers: int, vocab: int) -> dict:
    """An HF Llama config (dict) at these widths: head dim = hidden / heads (128 at 8B widths), plain RoPE."""
    return dict(widths, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                vocab_size=vocab, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False, hidden_act="silu")


def graphs_flag_available() -> bool:
    """Whether this checkout's ServingConfig has the CUDA-graph switch."""
    return "cuda_graphs" in ServingConfig.__dataclass_fields__


def serving_loop(info: Any, hf_config: dict, state: dict[str, torch.Tensor], tokenizer: Any, mode: str,
                 adapters: dict[str, str], dtype: str, engine: dict, max_lora_rank: int,
                 cuda_graphs: bool = False) -> Any:
    """A ServingLoop over an in-memory base (this process, TP=1), adapters from native checkpoint directories.

    The model is built on the host (megatron's CPU initialisation, as ServingLoop.create does), moved to the
    device, then the weights are copied in; one slot per adapter, so none is evicted while timing.
    """
    slots = max(1, len(adapters))
    graphs = {"cuda_graphs": True} if cuda_graphs else {}
    model = build_model(hf_config, 1, serving_settings(mode, 1, max_lora_rank), dtype, slots=slots, **graphs)
    model.to(info.device)
    load_base_state_dict(model, state)
    config = ServingConfig(megatron_dir=Path(BASE_NAME), mode=mode, adapters=dict(adapters), max_loras=slots,
                           max_lora_rank=max_lora_rank, dtype=dtype, **engine, **graphs)
    return ServingLoop(config, info, model.eval(), tokenizer)


def free_device_memory(graphs: bool = False) -> None:
    """After a loop is dropped: collect it (the model and engine sit in reference cycles with their hooks), drop
    megatron's process-wide CUDA-graph record (it keeps the captured layers alive) and return the memory."""
    gc.collect()
    if graphs:
        delete_cuda_graphs()
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN inside the block (restored after): float32 must mean float32 here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------- exactness


# BD adapters of different ranks, block counts (every count valid at TP=1 up to the CUDA graphs' 8 per rank),
# targets and scalings; each rank a multiple of its nblocks
EXACT_ADAPTERS = {
    "a0": LoRASettings(rank=8, alpha=16, nblocks=1),
    "a1": LoRASettings(rank=16, alpha=16, use_rslora=True, nblocks=2,
                       targets=("q_proj", "v_proj", "o_proj", "down_proj")),
    "a2": LoRASettings(rank=32, alpha=64, nblocks=4),
    "a3": LoRASettings(rank=64, alpha=64, nblocks=8, targets=("k_proj", "o_proj", "gate_proj", "up_proj")),
}
EXACT_B_STD = 0.02  # with A at unit gain: each adapter moves a layer's output by ~10-30%, so it changes tokens


@dataclass(frozen=True)
class ExactSize:
    """Model, stream and engine sizes of the exactness part."""

    widths: dict
    layers: int
    vocab: int
    requests: int
    prompt_len: tuple[int, int]
    new_tokens: tuple[int, int]
    engine: dict = field(default_factory=dict)  # ServingConfig fields


EXACT_FULL = ExactSize(LLAMA_8B_WIDTHS, 2, 32000, 15, (3, 200), (6, 12),
                       dict(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256, kv_cache_gb=0.25,
                            block_size=64))
EXACT_SMOKE = ExactSize(TINY_WIDTHS, 2, 512, 10, (3, 40), (4, 8),
                        dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, kv_cache_gb=0.01,
                             block_size=16))
Stream = list[tuple[int, list[int], "str | None", int]]  # (arrival step, prompt ids, adapter or None, max tokens)


def exact_stream(size: ExactSize, names: list[str], seed: int) -> Stream:
    """Requests for every adapter and the base in turn, two arriving per step give or take two steps (so requests
    join while others decode); some prompts longer than a step's token budget (chunked prefill)."""
    rng = random.Random(seed)
    choices = names + [None]
    out = []
    for i in range(size.requests):
        prompt = [rng.randrange(1, size.vocab - 1) for _ in range(rng.randint(*size.prompt_len))]  # EOS is vocab - 1
        out.append((i // 2 + rng.randrange(0, 3), prompt, choices[i % len(choices)], rng.randint(*size.new_tokens)))
    return out


def serve_stream(loop: Any, stream: Stream, deadline: float, max_steps: int = 2000) -> tuple[dict[int, dict], dict]:
    """Submit each request at its arrival step, step until all finished (or the deadline). Returns per request its
    tokens, finish reason, error and the served last-token logits of each step (`samplers.record_logits`); and what
    the stream exercised (most requests running in one step, whether a prefill was chunked, engine steps)."""
    loop.samplers.record_logits = True
    queues: dict[int, tuple[int, Any]] = {}
    got: dict[int, dict] = {}
    ctx = loop.engine.context
    seen = dict(max_running=0, chunked_prefill=False)  # what the stream exercised
    for step in range(max_steps):
        for i, (arrive, prompt, adapter, max_tokens) in enumerate(stream):
            if arrive == step:
                params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                queues[i] = loop.submit(prompt, adapter, params)
        loop.step()
        seen["max_running"] = max(seen["max_running"], int(ctx.total_request_count - ctx.paused_request_count))
        seen["chunked_prefill"] |= ctx.chunked_prefill_request_id != -1
        for i, (rid, q) in queues.items():
            rec = got.setdefault(i, dict(rid=rid, tokens=[], finish=None, error=None))
            while not q.empty():
                ev = q.get_nowait()
                rec["tokens"] += ev.token_ids
                if ev.finished:
                    rec["finish"], rec["error"] = ev.finish_reason, ev.error
        if len(got) == len(stream) and all(r["finish"] for r in got.values()):
            break
        if time.monotonic() > deadline:
            break
    for rec in got.values():
        rec["logits"] = loop.samplers.logits.get(rec["rid"], [])  # [vocab] per step, on the device
    seen["steps"] = step + 1
    return got, seen


def full_logits(model: torch.nn.Module, ids: list[int], device: torch.device) -> torch.Tensor:
    """Last-token logits [vocab] (float32) of a whole sequence, recomputed without a KV cache (megatron's own
    attention under a causal mask); model.forward_logits builds its mask and positions on the host."""
    s = len(ids)
    tokens = torch.tensor([ids], device=device)  # [1, s]
    positions = torch.arange(s, device=device)[None]  # [1, s]
    # [1, 1, s, s] True = hidden
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    logits = model(tokens, positions, mask, runtime_gather_output=True)  # [1, s, padded vocab]
    return logits[0, -1, : model.hf_config["vocab_size"]].float()


@torch.no_grad()
def merged_references(info: Any, hf_config: dict, state: dict[str, torch.Tensor], adapters: dict[str, tuple],
                      stream: Stream, deadline: float) -> tuple[list, list]:
    """Per request alone: greedy tokens and last-token logits of every step with its adapter merged into the base
    weights (float64 delta) and the whole sequence recomputed; and every request's greedy tokens under the base
    model (do the adapters change the output at all?). None where the deadline passed first.

    adapters: name -> (LoRASettings, full stored factors).
    """
    refs: list = [None] * len(stream)
    base_tokens: list = [None] * len(stream)
    for name in [None] + sorted({a for _, _, a, _ in stream if a is not None}):
        settings, factors = adapters[name] if name is not None else (None, None)
        model = build_model(hf_config, 1, settings).to(info.device)
        load_base_state_dict(model, state)
        if settings is not None:
            on_device = {k: (a.to(info.device), b.to(info.device)) for k, (a, b) in factors.items()}
            load_full_adapter(model, on_device, scaling=settings.scaling)
            for module in model.modules():
                if isinstance(module, LoRAParallelLinear):
                    module.merge_lora()
        model.eval()
        for i, (_, prompt, adapter, steps) in enumerate(stream):
            if (adapter != name and name is not None) or time.monotonic() > deadline:
                continue
            ids, tokens, logits = list(prompt), [], []
            for _ in range(steps):
                last = full_logits(model, ids, info.device)
                logits.append(last.cpu())
                tokens.append(int(last.argmax()))
                ids.append(tokens[-1])
            if name is None:
                base_tokens[i] = tokens
            if adapter == name:
                refs[i] = (tokens, logits)
        del model
        free_device_memory()
    return refs, base_tokens


_REFERENCES: dict[tuple, tuple[list, list]] = {}  # the eager and the graphs part check against the same references


def compare_request(got: dict | None, ref: tuple | None, max_tokens: int, out_of_time: bool = False) -> dict:
    """One request's verdict: tokens equal and every compared step's logits within LOGIT_TOLERANCE of the reference's
    scale. A first divergence where the reference's two best logits are closer than the tolerance is a tie (both
    tokens are right); logits are compared up to and including the first divergence (later prefixes differ).
    out_of_time: the stream was cut by the budget, so an unfinished request is unchecked rather than wrong."""
    if ref is None:
        return dict(checked=False, ok=None, why="no reference (budget)")
    if out_of_time and (got is None or got["finish"] is None):
        return dict(checked=False, ok=None, why="not finished when the budget ran out")
    if got is None or got["finish"] != "length":
        return dict(checked=True, ok=False, why=f"finished with {None if got is None else got['finish']!r}"
                    + (f": {got['error']}" if got and got.get("error") else ""))
    want_tokens, want_logits = ref
    tokens, logits = got["tokens"], got["logits"]
    if len(logits) != max_tokens:
        return dict(checked=True, ok=False, why=f"{len(logits)} logit rows for {max_tokens} tokens")
    scale = max(w.abs().max().item() for w in want_logits)
    div = next((k for k, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), None)
    upto = len(want_tokens) if div is None else div + 1
    err = max((g.float().cpu() - w).abs().max().item() for g, w in zip(logits[:upto], want_logits[:upto])) / scale
    tie = False
    if div is not None:
        top2 = torch.topk(want_logits[div], 2).values
        tie = (top2[0] - top2[1]).item() <= LOGIT_TOLERANCE * scale
    ok = (div is None or tie) and err <= LOGIT_TOLERANCE and len(tokens) == len(want_tokens)
    why = "" if ok else ("tokens differ" if div is not None and not tie else "") + (
        f" logits differ by {err:.2e} of their scale" if err > LOGIT_TOLERANCE else "")
    return dict(checked=True, ok=ok, tokens_equal=div is None, first_divergence=div, tie=tie, rel_logit_err=err,
                logit_scale=scale, why=why.strip())


def exactness_part(smoke: bool, budget_s: float, cuda_graphs: bool = False, seed: int = 0) -> PartResult:
    """Serve the mixed stream once and check every request against its merged, recomputed reference.

    status: ok (every request checked and equal), mismatch (the failing request ids in `why`), skipped (no GPU
    for a full run or for CUDA graphs; the budget ran out before every request was checked, nothing wrong found).
    """
    name = "engine_exactness" + ("_graphs" if cuda_graphs else "")
    start = time.monotonic()
    deadline = start + budget_s
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        return PartResult(name, "skipped", "no CUDA device (smoke=True runs the check on CPU at tiny widths)")
    if cuda_graphs and not gpu:
        return PartResult(name, "skipped", "CUDA graphs need a GPU")
    if cuda_graphs and not graphs_flag_available():
        return PartResult(name, "skipped", "ServingConfig has no cuda_graphs flag in this checkout")
    size = EXACT_SMOKE if smoke else EXACT_FULL
    hf_config = llama_config(size.widths, size.layers, size.vocab)
    names = list(EXACT_ADAPTERS)
    stream = exact_stream(size, names, seed)
    max_rank = max(s.rank for s in EXACT_ADAPTERS.values())
    data: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if gpu else "cpu", dtype="float32", tf32=False, cuda_graphs=cuda_graphs,
        model=dict(hf_config, tp=1), engine=size.engine, logit_tolerance=LOGIT_TOLERANCE,
        adapters={n: dict(rank=s.rank, nblocks=s.nblocks, alpha=s.alpha, rslora=s.use_rslora, targets=list(s.targets))
                  for n, s in EXACT_ADAPTERS.items()},
    )
    with exact_float32(), single_process_group() as info, tempfile.TemporaryDirectory(prefix="gpu_exact_") as tmp:
        state = random_base_state(hf_config, info.device, torch.float32, seed)
        factors = {n: random_adapter_factors(hf_config, s, 1, seed=100 + i, b_std=EXACT_B_STD)
                   for i, (n, s) in enumerate(EXACT_ADAPTERS.items())}
        dirs = {n: save_adapter(Path(tmp) / n, hf_config, s, 1, factors[n]) for n, s in EXACT_ADAPTERS.items()}
        t0 = time.monotonic()
        loop = serving_loop(info, hf_config, state, word_tokenizer(size.vocab), "block_diagonal", dirs, "float32",
                            size.engine, max_rank, cuda_graphs)
        data["loop_build_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        got, seen = serve_stream(loop, stream, deadline)
        out_of_time = time.monotonic() > deadline
        data["serve_s"] = round(time.monotonic() - t0, 2)
        data["engine"] = dict(size.engine, evictions=loop.engine.evicted_request_count, pool=loop.pool.stats(), **seen)
        loop = None
        free_device_memory(cuda_graphs)
        t0 = time.monotonic()
        key = (smoke, str(info.device), seed)
        if key not in _REFERENCES:
            refs = merged_references(info, hf_config, state, {n: (EXACT_ADAPTERS[n], factors[n]) for n in names},
                                     stream, deadline)
            if all(r is not None for r in refs[0]):
                _REFERENCES[key] = refs
        else:
            refs = _REFERENCES[key]
        data["reference_s"] = round(time.monotonic() - t0, 2)
        del state
    rows = []
    for i, (arrive, prompt, adapter, max_tokens) in enumerate(stream):
        verdict = compare_request(got.get(i), refs[0][i], max_tokens, out_of_time)
        base = refs[1][i]
        acts = None if adapter is None or base is None or refs[0][i] is None else refs[0][i][0] != base
        rows.append(dict(request=i, adapter=adapter, arrival_step=arrive, prompt_len=len(prompt), max_tokens=max_tokens,
                         adapter_changes_tokens=acts, **verdict))
    data["requests"] = rows
    failed = [r["request"] for r in rows if r["ok"] is False]
    unchecked = [r["request"] for r in rows if not r["checked"]]
    checked = [r for r in rows if r["checked"]]
    data["max_rel_logit_err"] = max((r.get("rel_logit_err", 0.0) for r in checked), default=None)
    notes = [f"{len(checked)} of {len(rows)} requests checked"]
    if failed:
        status = "mismatch"
        notes.insert(0, f"requests {failed} differ from their merged reference")
    elif unchecked:
        status = "skipped"
        notes.append(f"budget {budget_s:.0f} s ran out before requests {unchecked} (none wrong so far)")
    else:
        status = "ok"
    ties = [r["request"] for r in rows if r.get("tie")]
    if ties:
        notes.append(f"near-tie first divergences (both tokens right) in requests {ties}")
    if data["max_rel_logit_err"] is not None:
        notes.append(f"max logit error {data['max_rel_logit_err']:.1e} of scale")
    return PartResult(name, status, "; ".join(notes), data=data, markdown=exactness_markdown(data, rows, smoke))


def exactness_markdown(data: dict, rows: list[dict], smoke: bool) -> str:
    """The stream and its verdict per adapter (one row per adapter and the base)."""
    m = data["model"]
    lines = [
        f"Mixed stream through ServingLoop at TP=1 on {data['device']}, float32, TF32 off, CUDA graphs "
        f"{'on' if data['cuda_graphs'] else 'off'}; random Llama {m['num_hidden_layers']} layers, hidden "
        f"{m['hidden_size']}, ffn {m['intermediate_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} "
        f"heads, vocab {m['vocab_size']}{' (smoke: tiny widths, CPU)' if smoke else ' (Llama-3.1-8B layer widths)'}. "
        f"{len(rows)} greedy requests arriving over steps 0-{max(r['arrival_step'] for r in rows)}, prompts "
        f"{min(r['prompt_len'] for r in rows)}-{max(r['prompt_len'] for r in rows)} tokens (step budget "
        f"{data['engine']['max_num_batched_tokens']}), {data['engine'].get('steps')} engine steps, "
        f"up to {data['engine'].get('max_running')} requests in a step, chunked prefill "
        f"{'seen' if data['engine'].get('chunked_prefill') else 'not seen'}, {data['engine'].get('evictions')} "
        f"evictions. Reference: the request alone, adapter merged, full recompute every step; error = "
        f"max |served - reference| / max |reference| of its logits (tolerance {LOGIT_TOLERANCE:g}).",
        "", "| adapter | rank | nblocks | targets | requests | equal | max rel logit err | adapter changes tokens |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name in list(data["adapters"]) + [None]:
        group = [r for r in rows if r["adapter"] == name]
        if not group:
            continue
        a = data["adapters"].get(name)
        errs = [r["rel_logit_err"] for r in group if r.get("rel_logit_err") is not None]
        acts = [r["adapter_changes_tokens"] for r in group if r["adapter_changes_tokens"] is not None]
        if a is None:
            rank = nblocks = targets = "-"
        else:
            rank, nblocks = a["rank"], a["nblocks"]
            short = ",".join(t.removesuffix("_proj") for t in a["targets"])
            targets = "all" if tuple(a["targets"]) == ALL_TARGETS else short
        lines.append(f"| {name or 'base'} | {rank} | {nblocks} | {targets} | {len(group)} "
                     f"| {sum(bool(r['ok']) for r in group)}/{len(group)} | {_fmt(max(errs, default=None), '.1e')} "
                     f"| {f'{sum(acts)}/{len(acts)}' if acts else '-'} |")
    bad = [r for r in rows if r["ok"] is False]
    for r in bad:
        lines.append(f"\nrequest {r['request']} ({r['adapter'] or 'base'}, prompt {r['prompt_len']}): {r['why']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- speed


@dataclass(frozen=True)
class SpeedSize:
    """Model, workload and engine sizes of the speed part."""

    widths: dict
    layers: int
    vocab: int
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    adapter: LoRASettings  # the 4 adapters' settings (seeds differ)
    engine: dict  # ServingConfig fields
    profile_batch: int
    profile_steps: int


NUM_ADAPTERS = 4
SPEED_FULL = SpeedSize(LLAMA_8B_WIDTHS, 4, 32000, (1, 8, 32, 64), 32, 32, LoRASettings(rank=32, alpha=64, nblocks=8),
                       dict(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=128, kv_cache_gb=1.0,
                            block_size=64), profile_batch=32, profile_steps=6)
SPEED_SMOKE = SpeedSize(TINY_WIDTHS, 2, 512, (1, 4), 8, 6, LoRASettings(rank=8, alpha=16, nblocks=4),
                        dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, kv_cache_gb=0.01,
                             block_size=16), profile_batch=4, profile_steps=2)
SYSTEMS = ("BD", "replicated", "none", "PEFT")  # table order


class _StepProbe:
    """Forward pre-hook on the served model: did the engine's last forward decode only, and for how many requests."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.decode_only: bool | None = None
        self.active = 0
        loop.model.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        ctx = self.loop.engine.context
        self.decode_only = bool(ctx.is_decode_only())
        self.active = int(ctx.total_request_count - ctx.paused_request_count)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def lora_ranges() -> Iterator[None]:
    """Name every LoRA branch of a serving forward (`add_lora_slots`: shrink, collective, expand) as one profiler
    range, so its CPU and device time can be told from the step's."""
    real = LoRAParallelLinear.add_lora_slots

    def add_lora_slots(self, x: torch.Tensor, base: torch.Tensor) -> None:
        with torch.profiler.record_function(LORA_RANGE):
            return real(self, x, base)

    LoRAParallelLinear.add_lora_slots = add_lora_slots
    try:
        yield
    finally:
        LoRAParallelLinear.add_lora_slots = real


def run_ours(loop: Any, probe: _StepProbe, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
             profile_steps: int = 0) -> dict:
    """All requests at once, stepped to the end; each step timed on the host after a device sync (the loop itself
    reads the sampled tokens back every step). Decode steps are those whose forward decoded only, with every
    request running. profile_steps > 0: that many decode steps (after two) under torch.profiler, summarised."""
    params = GenerationParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    queues = [loop.submit(p, a, params)[1] for p, a in zip(prompts, adapters)]
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    decode_s: list[float] = []
    prof, profiled, summary = None, 0, None
    t_start = time.perf_counter()
    try:
        for steps in range(1, 20 * new_tokens + 100):
            if profile_steps and prof is None and summary is None and len(decode_s) >= 2:
                acts = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
            probe.decode_only = None
            t0 = time.perf_counter()
            with torch.profiler.record_function(STEP_RANGE) if prof is not None else contextlib.nullcontext():
                loop.step()
                _sync()
            dt = time.perf_counter() - t0
            if probe.decode_only and probe.active == len(prompts):
                decode_s.append(dt)
            if prof is not None:
                profiled += 1
                if profiled >= profile_steps:
                    prof.__exit__(None, None, None)
                    summary, prof = lora_share(prof), None
            for i, q in enumerate(queues):
                while not q.empty():
                    ev = q.get_nowait()
                    tokens[i] += ev.token_ids
                    if ev.finished:
                        if ev.finish_reason != "length":
                            raise RuntimeError(f"request {i} finished with {ev.finish_reason}: {ev.error}")
                        done[i] = True
            if all(done):
                break
        else:
            raise RuntimeError(f"{len(prompts)} requests of {new_tokens} tokens not finished after {steps} steps")
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
    return dict(tokens=tokens, decode_step_s=decode_s, wall_s=time.perf_counter() - t_start, steps=steps,
                profile=summary)


def lora_share(prof: Any) -> dict:
    """Share of the profiled engine steps spent in LoRA branches: host time (CPU) and, on a GPU, device time of the
    kernels launched inside the LoRA ranges, and of the LoRA kernel by name (a cross-check of the attribution)."""
    events = prof.events()
    steps = [e for e in events if e.name == STEP_RANGE and e.device_type == DeviceType.CPU]
    lora = [e for e in events if e.name == LORA_RANGE and e.device_type == DeviceType.CPU]
    n = max(1, len(steps))
    cpu_step = sum(e.cpu_time_total for e in steps)
    cpu_lora = sum(e.cpu_time_total for e in lora)
    out: dict[str, Any] = dict(profiled_steps=len(steps), lora_ranges_per_step=len(lora) / n,
                               cpu_ms_per_step=cpu_step / 1e3 / n,
                               cpu_lora_share=cpu_lora / cpu_step if cpu_step else None)
    if torch.cuda.is_available():
        dev_step = sum(e.device_time_total for e in steps)
        dev_lora = sum(e.device_time_total for e in lora)
        device_events = [e for e in events
                         if e.device_type == DeviceType.CUDA and e.name not in (STEP_RANGE, LORA_RANGE)]
        dev_kernel = sum(e.time_range.elapsed_us() for e in device_events if any(k in e.name for k in LORA_KERNELS))
        kernels_total = sum(e.time_range.elapsed_us() for e in device_events)
        out.update(device_ms_per_step=dev_step / 1e3 / n, device_lora_share=dev_lora / dev_step if dev_step else None,
                   device_lora_kernel_share=dev_kernel / dev_step if dev_step else None,
                   device_kernels_ms_per_step=kernels_total / 1e3 / n)
    return out


def run_peft(batcher: PeftBatcher, prompts: list[list[int]], adapters: list[str], new_tokens: int) -> dict:
    """One static left-padded batch through transformers' generate with per-row adapters; decode steps are the
    gaps between consecutive tokens."""
    workload = [dict(arrival_s=0.0, prompt_ids=p, output_len=new_tokens) for p in prompts]
    batcher.batch_size = len(prompts)
    t0 = time.perf_counter()
    result = batcher.replay(workload, adapters)
    return dict(tokens=[r["tokens"] for r in result["requests"]], decode_step_s=result["decode_step_s"],
                wall_s=time.perf_counter() - t0, steps=result["engine_steps"])


def summarise(system: str, batch: int, graphs: bool | None, run: dict, new_tokens: int) -> dict:
    """One table row: decode tok/s = batch / median decode step; p10-p90 of the step; end-to-end tok/s."""
    s = run["decode_step_s"]
    row = dict(system=system, batch=batch, graphs=graphs, decode_steps=len(s), steps=run["steps"],
               wall_s=run["wall_s"], e2e_tokens_per_s=batch * new_tokens / run["wall_s"])
    if s:
        p10, p50, p90 = (1e3 * percentile(s, q) for q in (10, 50, 90))
        row.update(step_ms_p10=p10, step_ms_p50=p50, step_ms_p90=p90, step_ms_mean=1e3 * statistics.fmean(s),
                   spread_pct=100 * (p90 - p10) / p50, tokens_per_s=1e3 * batch / p50)
    else:
        row.update(step_ms_p10=None, step_ms_p50=None, step_ms_p90=None, step_ms_mean=None, spread_pct=None,
                   tokens_per_s=None)
    return row


@dataclass
class _Task:
    """One engine to build and the systems it serves (or PEFT), eager or under CUDA graphs."""

    label: str
    mode: str | None  # None: transformers + PEFT
    systems: tuple[str, ...]
    graphs: bool | None


def speed_tasks(graphs_modes: tuple[bool, ...]) -> list[_Task]:
    """In priority order (a short budget keeps the first): BD + no adapter eager, PEFT, then under CUDA graphs,
    then replicated eager and under graphs."""
    tasks = []
    for graphs in graphs_modes:
        tasks.append(_Task(f"BD loop{' (graphs)' if graphs else ''}", "block_diagonal", ("BD", "none"), graphs))
        if not graphs:
            tasks.append(_Task("PEFT", None, ("PEFT",), None))
    for graphs in graphs_modes:
        tasks.append(_Task(f"replicated loop{' (graphs)' if graphs else ''}", "replicated", ("replicated",), graphs))
    return tasks


def speed_part(smoke: bool, budget_s: float, graphs_modes: tuple[bool, ...] = (False, True),
               seed: int = 0) -> PartResult:
    """Decode speed of BD / replicated / no adapter / PEFT at each batch, eager and under CUDA graphs (bf16).

    Points that would not fit in `budget_s` are skipped with why, keeping the measured ones; an engine that fails to
    build or run is reported (status error) and the other systems still run. Greedy outputs of the systems are
    compared and only counted: bf16 with different summation orders may diverge.
    """
    name = "serving_speed"
    start = time.monotonic()
    deadline = start + budget_s
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        return PartResult(name, "skipped", "no CUDA device (smoke=True runs the part on CPU at tiny widths)")
    size = SPEED_SMOKE if smoke else SPEED_FULL
    notes: list[str] = []
    modes = []
    for graphs in dict.fromkeys(graphs_modes):
        if graphs and not gpu:
            notes.append("CUDA graphs skipped: no GPU")
        elif graphs and not graphs_flag_available():
            notes.append("CUDA graphs skipped: ServingConfig has no cuda_graphs flag in this checkout")
        else:
            modes.append(graphs)
    hf_config = llama_config(size.widths, size.layers, size.vocab)
    dtype, dtype_name = torch.bfloat16, "bfloat16"
    rng = random.Random(seed)
    max_batch = max(size.batches)
    prompts = [[rng.randrange(1, size.vocab - 1) for _ in range(size.prompt_len)] for _ in range(max_batch)]
    names = [f"a{k}" for k in range(NUM_ADAPTERS)]
    mixed = [names[j % NUM_ADAPTERS] for j in range(max_batch)]  # every batch > 1 mixes the adapters
    rows: list[dict] = []
    skipped: list[dict] = []
    errors: list[dict] = []
    tokens: dict[tuple, list[list[int]]] = {}
    profile = None
    data: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if gpu else "cpu", dtype=dtype_name, model=dict(hf_config, tp=1),
        engine=size.engine, prompt_len=size.prompt_len, new_tokens=size.new_tokens, batches=list(size.batches),
        adapters=dict(count=NUM_ADAPTERS, rank=size.adapter.rank, nblocks=size.adapter.nblocks, targets="all seven",
                      assignment="request j -> adapter j % 4 (none: base model)"),
        timing="decode step = one ServingLoop.step (engine step, sampling, token events) whose forward decoded only "
               "with every request running, host clock after a device sync; PEFT: gap between consecutive tokens of "
               "generate; tok/s = batch / median step",
        peft="transformers + PEFT mixed batching (generate(adapter_names=...)), static batch, same prompts and "
             "adapters, bf16 with autocast_adapter_dtype=False (LoRA in bf16, as ours)",
    )
    est = dict(build=0.0, point=0.0)  # longest engine build + warm-up so far, last point's seconds
    out_of_budget = f"budget of {budget_s:.0f} s spent"

    def left() -> float:
        return deadline - time.monotonic()

    def skip_rest(task: _Task, batches: tuple[int, ...], why: str) -> None:
        for b in batches:
            for s in task.systems:
                skipped.append(dict(system=s, batch=b, graphs=task.graphs, why=why))

    with single_process_group() as info, tempfile.TemporaryDirectory(prefix="gpu_speed_") as tmp:
        state = random_base_state(hf_config, info.device, dtype, seed)
        settings = size.adapter
        factors = {n: random_adapter_factors(hf_config, settings, 1, seed=1000 + k) for k, n in enumerate(names)}
        dirs = {n: save_adapter(Path(tmp) / "native" / n, hf_config, settings, 1, factors[n]) for n in names}
        tokenizer = word_tokenizer(size.vocab)
        for task in speed_tasks(tuple(modes)):
            if left() < est["build"] + est["point"]:
                skip_rest(task, size.batches, out_of_budget)
                continue
            loop = batcher = None
            done: list[int] = []
            try:
                t0 = time.monotonic()
                if task.mode is None:
                    peft_dirs = {n: str(export_peft_directory(dirs[n], Path(tmp) / "peft" / n)) for n in names}
                    batcher = PeftBatcher(hf_llama(hf_config, state, dtype), peft_dirs, max_batch,
                                          autocast_adapter_dtype=False)
                    run_peft(batcher, prompts, mixed, 3)  # warm-up (first-call costs)
                else:
                    loop = serving_loop(info, hf_config, state, tokenizer, task.mode, dirs, dtype_name, size.engine,
                                        settings.rank, bool(task.graphs))
                    probe = _StepProbe(loop)
                    run_ours(loop, probe, prompts, mixed, 3)  # warm-up: kernel compiles, every adapter in its slot
                est["build"] = max(est["build"], time.monotonic() - t0)
                for batch in size.batches:
                    for system in task.systems:
                        if left() < 1.2 * est["point"]:
                            skipped.append(dict(system=system, batch=batch, graphs=task.graphs, why=out_of_budget))
                            continue
                        t0 = time.monotonic()
                        adapters = [None] * batch if system == "none" else mixed[:batch]
                        if system == "PEFT":
                            run = run_peft(batcher, prompts[:batch], [a or PEFT_BASE for a in adapters],
                                           size.new_tokens)
                        else:
                            run = run_ours(loop, probe, prompts[:batch], adapters, size.new_tokens)
                        est["point"] = max(est["point"] * 0.5, time.monotonic() - t0)
                        rows.append(summarise(system, batch, task.graphs, run, size.new_tokens))
                        tokens[(system, batch, task.graphs)] = run["tokens"]
                    done.append(batch)
                if task.systems[0] == "BD" and not task.graphs and profile is None and left() > 2 * est["point"]:
                    batch = min(size.profile_batch, max_batch)
                    with lora_ranges():
                        run = run_ours(loop, probe, prompts[:batch], mixed[:batch], size.new_tokens,
                                       profile_steps=size.profile_steps)
                    profile = dict(run["profile"] or {}, batch=batch, system="BD", graphs=False)
            except Exception as exc:  # keep the other systems' numbers: one broken engine must not hide them
                errors.append(dict(task=task.label, error=f"{type(exc).__name__}: {exc}",
                                   traceback=traceback.format_exc()))
                skip_rest(task, tuple(b for b in size.batches if b not in done),
                          f"{task.label} failed: {type(exc).__name__}")
            finally:
                loop = batcher = probe = None
                free_device_memory(bool(task.graphs))
        del state
    data.update(rows=rows, skipped=skipped, errors=errors, profile=profile, agreement=agreement(tokens))
    ratio_rows = ratios(rows)
    data["ratios"] = ratio_rows
    if errors:
        status = "error"
        notes.insert(0, "; ".join(f"{e['task']}: {e['error']}" for e in errors))
    elif not rows:
        status = "skipped"
    else:
        status = "ok"
    if skipped:
        notes.append(f"{len(skipped)} points skipped ({'; '.join(sorted({s['why'] for s in skipped}))})")
    notes.append(f"{len(rows)} points measured")
    return PartResult(name, status, "; ".join(notes), data=data,
                      markdown=speed_markdown(data, rows, ratio_rows, skipped, profile, smoke))


def agreement(tokens: dict[tuple, list[list[int]]]) -> dict:
    """Greedy outputs compared (counted, never failed): BD against PEFT, replicated and itself under CUDA graphs;
    the base model against BD (the adapters act)."""
    out = {}
    for (system, batch, graphs), toks in tokens.items():
        if system == "BD":
            pairs = [("PEFT", batch, None), ("replicated", batch, graphs), ("none", batch, graphs)]
            if graphs:
                pairs.append(("BD", batch, False))
            for other in pairs:
                if other in tokens:
                    c = compare_tokens(toks, tokens[other])
                    key = (f"BD{'+graphs' if graphs else ''} vs {other[0]}{'+graphs' if other[2] else ''} "
                           f"@ batch {batch}")
                    out[key] = dict(requests=c["requests"], identical=c["exact_match_requests"],
                                    tokens_before_first_divergence=round(c["tokens_before_first_divergence"], 3))
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """BD's decode tok/s over none, PEFT and replicated at each batch and graphs setting (> 1: BD faster)."""
    by = {(r["system"], r["batch"], r["graphs"]): r["tokens_per_s"] for r in rows}
    out = []
    for (system, batch, graphs), tps in by.items():
        if system != "BD" or not tps:
            continue
        row = dict(batch=batch, graphs=graphs)
        for other, key in (("none", (batch, graphs)), ("PEFT", (batch, None)), ("replicated", (batch, graphs))):
            o = by.get((other, *key))
            row[f"bd_over_{other.lower()}"] = tps / o if o else None
        out.append(row)
    return sorted(out, key=lambda r: (bool(r["graphs"]), r["batch"]))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def speed_markdown(data: dict, rows: list[dict], ratio_rows: list[dict], skipped: list[dict], profile: dict | None,
                   smoke: bool) -> str:
    """The systems table, BD's ratios per batch, the LoRA share of a step, agreement counts and what was skipped."""
    m = data["model"]
    a = data["adapters"]
    lines = [
        f"Decode speed on {data['device']}, {data['dtype']}, TP=1; random Llama {m['num_hidden_layers']} layers at "
        f"{'tiny widths (smoke)' if smoke else 'Llama-3.1-8B widths'} (hidden {m['hidden_size']}, ffn "
        f"{m['intermediate_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, vocab "
        f"{m['vocab_size']}); {a['count']} BD adapters rank {a['rank']} nblocks {a['nblocks']} on all seven "
        f"projections, mixed in every batch; prompts {data['prompt_len']} tokens, {data['new_tokens']} new tokens "
        f"per request, all requests at once. Step p50 / p10-p90 over the decode steps with every request running; "
        f"tok/s = batch / step p50.", "",
        "| system | batch | CUDA graphs | decode tok/s | step p50 ms | step p10-p90 ms | spread | decode steps |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    for r in sorted(rows, key=lambda r: (order[r["system"]], bool(r["graphs"]), r["batch"])):
        graphs = "-" if r["graphs"] is None else ("on" if r["graphs"] else "off")
        lines.append(f"| {r['system']} | {r['batch']} | {graphs} | {_fmt(r['tokens_per_s'], '.1f')} "
                     f"| {_fmt(r['step_ms_p50'], '.2f')} "
                     f"| {_fmt(r['step_ms_p10'], '.2f')}-{_fmt(r['step_ms_p90'], '.2f')} "
                     f"| {_fmt(r['spread_pct'], '.0f')}% | {r['decode_steps']} |")
    if ratio_rows:
        lines += ["", "BD's decode tok/s over the others' (> 1: BD faster; PEFT is eager):", "",
                  "| batch | CUDA graphs | BD / none | BD / PEFT | BD / replicated |", "|---:|---|---:|---:|---:|"]
        for r in ratio_rows:
            lines.append(f"| {r['batch']} | {'on' if r['graphs'] else 'off'} | {_fmt(r['bd_over_none'], '.3f')} "
                         f"| {_fmt(r['bd_over_peft'], '.3f')} | {_fmt(r['bd_over_replicated'], '.3f')} |")
    if profile:
        where = (f"device time {_fmt(_pct(profile.get('device_lora_share')), '.1f')}% in LoRA ranges "
                 f"({_fmt(_pct(profile.get('device_lora_kernel_share')), '.1f')}% in "
                 f"{' and '.join(LORA_KERNELS)} by name) of "
                 f"{_fmt(profile.get('device_ms_per_step'), '.2f')} ms per step; "
                 if "device_ms_per_step" in profile else "")
        lines += ["", f"LoRA share of a BD decode step (batch {profile['batch']}, eager, "
                      f"{profile.get('profiled_steps')} profiled steps): {where}host time "
                      f"{_fmt(_pct(profile.get('cpu_lora_share')), '.1f')}% of "
                      f"{_fmt(profile.get('cpu_ms_per_step'), '.2f')} ms per step "
                      f"({_fmt(profile.get('lora_ranges_per_step'), '.0f')} LoRA branches per step)."]
    if data["agreement"]:
        lines += ["", "Greedy agreement (counted, not checked: bf16 summation orders differ): " + "; ".join(
            f"{k}: {v['identical']}/{v['requests']} identical" for k, v in data["agreement"].items())]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(
            f"{s['system']} batch {s['batch']}{' graphs' if s['graphs'] else ''} ({s['why']})" for s in skipped)]
    for e in data["errors"]:
        lines += ["", f"{e['task']} failed: {e['error']}"]
    return "\n".join(lines)


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share
