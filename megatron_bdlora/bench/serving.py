"""Serve one seeded multi-adapter workload through our serving loop in each LoRA sharding mode and compare: the CPU
serving benchmark, its flags and its run (tools/bench_serving.py is its command line).

    python tools/bench_serving.py --tp 2 --modes block_diagonal,slora,replicated,none \\
        --json runs/bench_serving.json --plot runs/bench_serving.png
    python tools/bench_serving.py --tp 1 --peft --json runs/bench_serving_tp1.json --plot runs/bench_serving_tp1.png
    python tools/bench_serving.py --tp 2 --model-shape llama-3.1-8b --layers 2 --paper-ranks --json runs/paper_tp2.json
    python tools/bench_serving.py --model random --modes block_diagonal --num-adapters 1000 --max-loras 8 \
        --max-cpu-loras 64 --mixed-formats --json runs/bench_1000_adapters.json

One workload (prompts as token ids, an adapter per request drawn from a power-law popularity as in S-LoRA's
benchmark, arrival times, output lengths; all from --seed) is replayed in-process, without HTTP, through
`ServingLoop` (megatron-core's dynamic engine with adapter slots): at TP 1 in this process, at TP > 1 on
spawned gloo ranks where rank 0 submits by the arrival schedule against wall time and every rank steps in
lockstep. K random BD adapters (nblocks = TP) are written as native checkpoints; the slora and replicated
loops serve the same adapters converted exactly, so their greedy outputs must equal BD's (checked). Mode
"none" sends every request to the base model (same loop, no adapter): the floor. --peft (TP 1) also runs
the prompts through transformers + PEFT mixed-adapter batching (`generate(..., adapter_names=[...])`) in
static batches of --max-num-seqs requests, and compares its greedy outputs with ours.

Many adapters (S-LoRA's setting): --max-loras / --max-cpu-loras bound the adapter slots and host copies of our loops
(by default every adapter stays resident), so adapters dropped from the host cache are read again while their
requests wait (the loop's background reads); --mixed-formats stores every other adapter as a PEFT directory. The
tables then also show each system's adapter reads, their latency and the loop steps in which a request waited for
one; the warm-up then leaves the adapters outside its own requests cold (their reads are part of what is measured).

--model-shape gives the random base the per-layer widths of Llama-3.1-8B / 70B (d, ffn, query and KV heads;
SmolLM2's vocabulary of 49152, not 128256) with --layers layers. --paper-ranks compares as the paper does, at
ranks instead of exact conversions: plain LoRA adapters of rank r (--adapter-rank) in S-LoRA and replicated mode
(the same adapters: their greedy outputs must be equal) against BD adapters (nblocks = TP) of rank 2r, 4r and
the rank with LoRA's parameter count at this TP (megatron_bdlora.param_count.match_bd_rank, as tools/rank_match.py).

Per system: output tokens/s (generated tokens / wall time from the first arrival to the last token), time to
first token, time per output token after the first, the median decode-only step (robust to bursts of load
from other processes), request latency, engine steps, and the collectives of one decode-only engine step
(counted in the untimed warm-up). Ratios are BD's against each other system, measured in the same run
(systems interleaved, in rotating order, when --repeats > 1; the tables show medians over repeats). Timings
come from rank 0's time.perf_counter.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from megatron_bdlora.bench.environment import usable_cpu_count
from megatron_bdlora.bench.results import write_json
from megatron_bdlora.bench.serving_replay import serve_worker
from megatron_bdlora.bench.serving_report import (
    agreement,
    environment,
    expected_extra_collectives,
    format_agreement,
    format_profiles,
    format_ratios,
    format_systems,
    plot,
    ratios,
    summarise_system,
)
from megatron_bdlora.bench.serving_setup import (
    BD_PAPER_RANKS,
    LABELS,
    MODES,
    NONE,
    adapter_names,
    adapter_variants,
    make_workload,
    prepare_base,
    system_specs,
    write_adapters,
)
from megatron_bdlora.bench.workload import B_STD, single_process_group
from megatron_bdlora.checkpoint.peft import export_peft_directory
from megatron_bdlora.inference.requests import MAX_LOGPROBS
from megatron_bdlora.local_ranks import run_distributed
from megatron_bdlora.param_count import BUILTIN_CONFIGS


def _pair(text: str) -> tuple[int, int]:
    """'MIN,MAX' (or one number) -> (MIN, MAX)."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """tools/bench_serving.py's flags, checked (bench_sweep.py passes the same flags to each of its points)."""
    p = argparse.ArgumentParser(
        description="Replay one seeded multi-adapter workload through our serving loop in BD, S-LoRA and replicated "
        "mode (and with no adapter, and optionally transformers + PEFT) and compare throughput, latency, "
        "collectives and greedy outputs (CPU, local gloo ranks).",
    )
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree = local gloo ranks (1: this process); also BD's nblocks (default 1)")
    p.add_argument("--modes", default=",".join(MODES + (NONE,)),
                   help="comma-separated systems of our loop: block_diagonal, slora, replicated, none (none: every "
                   "request to the base model, the floor) (default: all four)")
    p.add_argument("--peft", action="store_true",
                   help="also run transformers + PEFT mixed-adapter batching on the same prompts (TP 1 only)")
    p.add_argument("--json", type=Path, default=None,
                   help="write workload, machine, per-system metrics, ratios and output checks to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG with bars of tokens/s and latency per system")
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=8, help="requests in the workload (default 8)")
    w.add_argument("--num-adapters", type=int, default=4,
                   help="K random BD adapters the requests are spread over (default 4)")
    w.add_argument("--adapter-rank", type=int, default=16,
                   help="rank r of every adapter; a multiple of --tp (default 16)")
    w.add_argument("--paper-ranks", action="store_true",
                   help="the paper's comparison: plain LoRA at r in S-LoRA / replicated vs BD at 2r, 4r and LoRA's "
                        "parameter count (rank-match at this TP), instead of one BD adapter set converted exactly")
    w.add_argument("--bd-ranks", default=",".join(r[3:] for r in BD_PAPER_RANKS),
                   help="with --paper-ranks: which BD systems to run, comma-separated from 2r, 4r, matched "
                        "(default: all three; fewer make a sweep cheaper)")
    w.add_argument("--mixed-formats", action="store_true",
                   help="serve every other adapter from a PEFT directory (exported exactly from its native "
                        "checkpoint), so that both formats are read from disk")
    w.add_argument("--popularity-alpha", type=float, default=1.0,
                   help="power-law (Zipf) popularity of the adapters as in S-LoRA's benchmark: adapter k is drawn with "
                   "weight 1/(k+1)^alpha; 0 = uniform (default 1.0)")
    w.add_argument("--arrival", choices=("poisson", "all"), default="all",
                   help="'all': every request arrives at t=0; 'poisson': exponential gaps at --rate (default all)")
    w.add_argument("--rate", type=float, default=4.0,
                   help="mean arrivals per second with --arrival poisson (default 4)")
    w.add_argument("--prompt-len", type=_pair, default=(24, 40), metavar="MIN,MAX",
                   help="prompt tokens, uniform in [MIN, MAX] (default 24,40)")
    w.add_argument("--output-len", type=_pair, default=(64, 64), metavar="MIN,MAX",
                   help="generated tokens per request, uniform in [MIN, MAX] (default 64,64)")
    w.add_argument("--seed", type=int, default=0,
                   help="seed of the workload, the adapters and the random base model (default 0)")
    m = p.add_argument_group("base model")
    m.add_argument("--model", choices=("smollm2", "random"), default=None,
                   help="smollm2: the embedded SmolLM2-135M-Instruct (float32; 3 KV heads, so TP 1 or 3); random: a "
                   "seeded random Llama of the shape below with SmolLM2's tokenizer (default: smollm2 at TP 1, random "
                   "otherwise)")
    m.add_argument("--model-shape", choices=("llama-3.1-8b", "llama-3.1-70b"), default=None,
                   help="random Llama with this model's per-layer widths (d, ffn, heads, KV heads; SmolLM2's "
                        "vocabulary) and --layers layers; overrides --hidden/--intermediate/--heads/--kv-heads")
    m.add_argument("--layers", type=int, default=None,
                   help="random Llama: decoder layers (default 16; 2 with --model-shape)")
    m.add_argument("--hidden", type=int, default=512, help="random Llama: hidden size (default 512)")
    m.add_argument("--intermediate", type=int, default=1536, help="random Llama: MLP width (default 1536)")
    m.add_argument("--heads", type=int, default=8, help="random Llama: attention heads (default 8)")
    m.add_argument("--kv-heads", type=int, default=4, help="random Llama: KV heads, divisible by --tp (default 4)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=8,
                   help="requests decoded concurrently (ours), batch size (PEFT) (default 8)")
    e.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step (prompt chunks + decodes); a multiple of 64 (default 512)")
    e.add_argument("--max-loras", type=int, default=None,
                   help="adapter slots of our loop (default: --num-adapters, all resident)")
    e.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapter host copies of our loop (default: --max-loras); adapters beyond them are read again "
                        "from disk when requested, off the engine's critical path")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="context length of the loop (default: longest prompt + output)")
    e.add_argument("--kv-cache-gb", type=float, default=0.5, help="paged KV cache per rank, GB (default 0.5)")
    e.add_argument("--block-size", type=int, default=64, help="KV cache block size in tokens (default 64)")
    r = p.add_argument_group("measurement")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: usable CPUs / TP, at least 1)")
    r.add_argument("--warmup", type=int, default=2,
                   help="requests of the workload (plus the first request of every adapter not among them; at most 6 "
                        "new tokens each) run untimed through each system first; their decode-only step gives the "
                        "collective counts (default 2)")
    r.add_argument("--timeout-s", type=float, default=4 * 3600.0,
                   help="give up on the ranks after this long (default 4 h)")
    r.add_argument("--repeats", type=int, default=1,
                   help="timed replays per system, interleaved across systems; the table shows medians (default 1)")
    w.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="every request of our loops also returns each generated token's log-probability and top K "
                        "(what `logprobs: K` costs; transformers + PEFT is unchanged)")
    w.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                   help="every request of our loops also scores its prompt in prefill, top K per token (echo scoring)")
    r.add_argument("--profile", action="store_true",
                   help="after the timed replays, one more per system under torch.profiler (CPU): its top ops by self "
                        "time per engine step on rank 0, printed and in the JSON (where a step's time goes)")
    args = p.parse_args(argv)
    if args.model_shape:
        shape = BUILTIN_CONFIGS[args.model_shape]
        args.model = "random"
        args.hidden, args.intermediate = shape["hidden_size"], shape["intermediate_size"]
        args.heads, args.kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        args.layers = args.layers or 2
    args.layers = args.layers or 16
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    unknown = [s for s in args.modes if s not in MODES + (NONE,)]
    if unknown or not args.modes or len(set(args.modes)) != len(args.modes):
        p.error(f"--modes must be distinct names from {list(MODES + (NONE,))}, got {args.modes}")
    args.bd_ranks = [f"bd_{s.strip()}" for s in args.bd_ranks.split(",") if s.strip()]
    if not args.bd_ranks or len(set(args.bd_ranks)) != len(args.bd_ranks) or set(args.bd_ranks) - set(BD_PAPER_RANKS):
        p.error(f"--bd-ranks must be distinct names from {[r[3:] for r in BD_PAPER_RANKS]}, "
                f"got {[r[3:] for r in args.bd_ranks]}")
    for flag in ("tp", "num_requests", "num_adapters", "adapter_rank", "layers", "hidden", "intermediate", "heads",
                 "kv_heads", "max_num_seqs", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("logprobs", "prompt_logprobs"):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) <= MAX_LOGPROBS:
            p.error(f"--{flag.replace('_', '-')} must be in [0, {MAX_LOGPROBS}], got {getattr(args, flag)}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the collectives are counted on the warm-up's decode steps)")
    if args.peft and args.tp != 1:
        p.error("--peft runs at --tp 1 only (transformers + PEFT is a single-process baseline)")
    if args.peft and args.paper_ranks:
        p.error("--peft compares the exactly converted adapters: it does not combine with --paper-ranks")
    if args.adapter_rank % args.tp:
        p.error(f"--adapter-rank {args.adapter_rank} must be a multiple of --tp {args.tp} (BD blocks the rank over TP)")
    if args.rate <= 0:
        p.error(f"--rate must be > 0, got {args.rate}")
    args.model = args.model or ("smollm2" if args.tp == 1 else "random")
    if args.model == "random" and (args.kv_heads % args.tp or args.heads % args.kv_heads or args.hidden % args.heads):
        p.error(f"random Llama: --kv-heads {args.kv_heads} must divide by --tp {args.tp}, --heads {args.heads} by "
                f"--kv-heads and --hidden {args.hidden} by --heads")
    if args.model == "smollm2" and 3 % args.tp:
        p.error(f"SmolLM2-135M has 3 KV heads: it cannot run at --tp {args.tp}; use --model random")
    args.max_loras = args.max_loras or args.num_adapters
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        p.error(f"--max-cpu-loras {args.max_cpu_loras} must be >= --max-loras {args.max_loras}")
    need = args.prompt_len[1] + args.output_len[1]
    args.max_model_len = args.max_model_len or need
    if args.max_model_len < need:
        p.error(f"--max-model-len {args.max_model_len} < longest prompt + output ({need})")
    args.threads = args.threads or max(1, usable_cpu_count() // args.tp)
    args.warmup = min(args.warmup, args.num_requests)
    return args


def _pool_text(args: argparse.Namespace) -> str:
    """The title's adapter pool, where it is not every adapter resident."""
    text = f", max-loras {args.max_loras}" if args.max_loras < args.num_adapters else ""
    text += f", max-cpu-loras {args.max_cpu_loras}" if args.max_cpu_loras is not None else ""
    return text + (", native and PEFT directories" if args.mixed_formats else "")


def _mixed(names: dict[str, list[str]]) -> list[str]:
    """--mixed-formats: the adapters served from PEFT directories (every other one of each variant)."""
    return [n for variant in names.values() for n in variant[1::2]]


def _peft_exported(args: argparse.Namespace, names: dict[str, list[str]]) -> list[str]:
    """The adapters written as PEFT directories too: all BD ones for the PEFT system, half for --mixed-formats."""
    return list(dict.fromkeys((names["bd"] if args.peft else []) + (_mixed(names) if args.mixed_formats else [])))


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark as parse_args' flags say, print the tables, write JSON and PNG; returns what the JSON holds."""
    # this benchmark measures the CPU/gloo path: keep every rank off any GPU (init_parallel picks nccl with CUDA)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    env = environment(args.threads)  # before the run: the code that runs is the code recorded
    hf_dir, meg_dir = prepare_base(args)
    hf_config = json.loads((meg_dir / "config.json").read_text())
    workload = make_workload(args, hf_config["vocab_size"])
    variants = adapter_variants(args, hf_config)
    specs = system_specs(args, variants)
    names = adapter_names(variants, args.num_adapters)
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        adapter_dirs = write_adapters(Path(tmp) / "native", hf_config, args, variants)
        peft_dirs = {}
        if args.peft or args.mixed_formats:
            peft_dirs = {n: str(export_peft_directory(adapter_dirs[n], Path(tmp) / "peft" / n))
                         for n in _peft_exported(args, names)}
        if args.mixed_formats:
            adapter_dirs |= {n: peft_dirs[n] for n in _mixed(names)}
        spec = dict(
            systems=specs, names=names, ranks={v: st.rank for v, st in variants.items()},
            threads=args.threads, warmup=args.warmup, repeats=args.repeats, profile=args.profile,
            sampling={k: v for k, v in (("logprobs", args.logprobs), ("prompt_logprobs", args.prompt_logprobs))
                      if v is not None},
            megatron_dir=str(meg_dir), hf_dir=str(hf_dir), peft_dirs=peft_dirs, adapter_rank=args.adapter_rank,
            max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
            all_adapters_cached=(args.max_cpu_loras or args.max_loras) >= args.num_adapters,
            engine=dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
                        seed=args.seed),
        )
        if args.tp == 1:  # in this process, with --threads threads
            with single_process_group() as info:
                raw = serve_worker(info, spec, workload, adapter_dirs)
        else:
            raw = run_distributed(serve_worker, args.tp, spec, workload, adapter_dirs, timeout=args.timeout_s)[0]

    rows = {s: summarise_system(s, specs[s]["label"], raw[s]) for s in specs}
    check = agreement(rows, specs)
    ratio_rows = ratios(rows, specs, args.tp, args.max_num_seqs)
    extra = {m: expected_extra_collectives(hf_config, m, args.tp, args.adapter_rank) for m in MODES}
    counts = Counter(r["adapter"] for r in workload)
    model_text = ("SmolLM2-135M" if args.model == "smollm2" else
                  f"random Llama {args.layers}L h{args.hidden} ffn{args.intermediate} {args.heads}H/{args.kv_heads}KV"
                  + (f" ({args.model_shape} widths, vocab {hf_config['vocab_size']})" if args.model_shape else ""))
    adapters_text = (f"{args.num_adapters} BD adapters rank {args.adapter_rank}" if not args.paper_ranks else
                     f"{args.num_adapters} adapters per system: " + ", ".join(
                         f"{v} r={st.rank}" for v, st in variants.items()))
    per_adapter = [counts[k] for k in range(args.num_adapters)]
    if args.num_adapters > 16:
        per_adapter = f"{per_adapter[:8]}... on {len(counts)} distinct adapters"
    title = (f"TP={args.tp}, {model_text}, float32, {args.threads} thread(s)/rank; {args.num_requests} requests "
             f"({args.arrival}{f' {args.rate}/s' if args.arrival == 'poisson' else ''}) over {adapters_text} "
             f"(requests per adapter {per_adapter}), "
             f"prompt {args.prompt_len[0]}-{args.prompt_len[1]}, output {args.output_len[0]}-{args.output_len[1]}, "
             f"max-num-seqs {args.max_num_seqs}{_pool_text(args)}; median of {args.repeats} repeat(s)")
    print(title)
    print(format_systems(list(rows.values())))
    print()
    print(format_ratios(ratio_rows))
    print()
    print(format_agreement(check, {s: row["label"] for s, row in rows.items()}))
    print("expected extra collectives per forward over the base: "
          + ", ".join(f"{LABELS[m]} {n}" for m, n in extra.items()))
    if args.profile:
        print()
        print(format_profiles(rows))

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    cfg.update(json=str(args.json) if args.json else None, plot=str(args.plot) if args.plot else None,
               megatron_dir=str(meg_dir), hf_dir=str(hf_dir), base_hf_config=hf_config,
               adapter_settings={v: dict(mode=st.mode.value, rank=st.rank, alpha=st.alpha, nblocks=st.nblocks,
                                         targets="all seven projections", b_std=B_STD) for v, st in variants.items()},
               systems_served={n: dict(s) for n, s in specs.items()},
               timing="rank 0 time.perf_counter from the first arrival; per system: warm-up, then --repeats timed "
                      "replays interleaved across systems; table values are medians over repeats",
               none="every request to the base model on the block_diagonal loop (adapter slots unused)",
               peft_batching="static batches of --max-num-seqs in arrival order, left-padded; a request's finish is "
                             "the step of its own last token")
    result = dict(
        config=cfg,
        environment=env,
        workload=dict(requests=workload, requests_per_adapter={f"a{k}": counts[k] for k in range(args.num_adapters)}),
        systems=rows,
        ratios=ratio_rows,
        agreement=check,
        expected_extra_collectives_per_forward=extra,
        title=title,
    )
    if args.plot:
        plot(args.plot, list(rows.values()), title)
        print(f"wrote {args.plot}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result
