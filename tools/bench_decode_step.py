"""Time our engine's no-adapter decode step against transformers' on the same batch, steps alternating.

    python tools/bench_decode_step.py --pairs 15 --json runs/decode_step.json

The batch is the serving benchmark's workload (tools/bench_serving.py's flags after ours: --num-requests,
--prompt-len, --seed, --model, ...; TP 1, in this process, --threads threads). Prints ours / transformers per
step (median, p10-p90 over pairs) and whether the greedy tokens agree; the work lives in
megatron_bdlora.bench.decode_step.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_bdlora.bench.decode_step import HFDecoder, paired_steps, summary
from megatron_bdlora.bench.environment import code_version, machine
from megatron_bdlora.bench.results import write_json
from megatron_bdlora.bench.serving import parse_args as serving_args
from megatron_bdlora.bench.serving_setup import make_workload, prepare_base
from megatron_bdlora.bench.workload import single_process_group


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=15, help="timed step pairs (default 15), after 3 untimed ones")
    p.add_argument("--json", default=None, help="write the per-pair times, the summary and the environment here")
    own, rest = p.parse_known_args(argv)
    if own.pairs < 1:
        p.error(f"--pairs must be >= 1, got {own.pairs}")
    args = serving_args(["--tp", "1", "--modes", "none", *rest])
    torch.set_num_threads(args.threads or 1)
    hf_dir, meg_dir = prepare_base(args)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    prompts = [r["prompt_ids"] for r in make_workload(args, hf_config["vocab_size"])]
    with single_process_group() as info:
        from transformers import AutoModelForCausalLM  # lazy: seconds to import

        from megatron_bdlora.inference.serving_config import ServingConfig
        from megatron_bdlora.inference.serving_loop import ServingLoop

        config = ServingConfig(megatron_dir=meg_dir, mode="block_diagonal", adapters={}, max_loras=1,
                               max_num_seqs=len(prompts), max_num_batched_tokens=args.max_num_batched_tokens,
                               max_model_len=max(map(len, prompts)) + own.pairs + 16, kv_cache_gb=args.kv_cache_gb,
                               block_size=args.block_size)
        loop = ServingLoop.create(config, info)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        hf = HFDecoder(model, prompts, pad_id=loop.tokenizer.pad_token_id or 0)
        run = paired_steps(loop, hf, prompts, own.pairs)
    result = summary(run)
    o, t, r = result["ours_ms"], result["transformers_ms"], result["ratio"]
    print(f"{len(prompts)} requests decoding, {torch.get_num_threads()} thread(s), {result['pairs']} alternating pairs")
    print("system        step ms median  p10-p90")
    print(f"ours (none)   {o['median']:14.1f}  {o['p10']:.1f}-{o['p90']:.1f}")
    print(f"transformers  {t['median']:14.1f}  {t['p10']:.1f}-{t['p90']:.1f}")
    print(f"ours / transformers per pair: median {r['median']:.3f} (p10-p90 {r['p10']:.3f}-{r['p90']:.3f})")
    print(f"greedy tokens equal over the first {result['compared_tokens_per_request']}: "
          f"{result['requests_with_equal_greedy_tokens']}/{result['requests']} requests")
    if own.json:
        write_json(own.json, dict(config=dict(vars(args), pairs=own.pairs, json=own.json), summary=result, run=run,
                                  machine=machine(), code=code_version()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
