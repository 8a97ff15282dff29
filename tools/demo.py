"""`make demo`: the main job end to end on the embedded SmolLM2-135M-Instruct at TP=3 (3 local gloo ranks).

    python tools/demo.py [--out-dir runs/demo] [--data-dir data] [--steps 5] [--lr 3e-3] [--fresh]

  1. data   the demo corpora (tools/prepare_data.py): DATA/milton, DATA/shakespeare_comedies
  2. base   the embedded base as HF safetensors and its TP=3 megatron shards (the project cache)
  3. train  one BD-LoRA adapter per corpus at TP=3 (launch/train.sh, the base config plus overrides): OUT/<corpus>
  4. serve  the base and both adapters in one mixed batch through the serving engine at TP=3: OUT/samples.json
     ppl    held-out perplexity, 3 models x 2 corpora, model forward at TP=3 with the trainer's evaluation:
            OUT/perplexity.json; each adapter must be the best model on its own corpus
  5. bench  tools/bench_serving.py --tp 3: BD vs S-LoRA vs replicated vs no adapter: OUT/bench_serving.{json,png,txt}

A step whose output exists is skipped (its saved result is printed again), so a rerun is fast; --fresh redoes the
steps that write under OUT. Exit status 1 when an adapter is not the best model on its own corpus.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# lazy (the package's imports inside the functions below): torch, megatron-core and transformers take seconds, so
# --help and bad flags answer at once
REPO = Path(__file__).resolve().parents[1]

TP = 3  # SmolLM2-135M has 3 KV heads: TP 1 or 3; BD blocks = TP, so the adapters are communication-free
CONFIG = REPO / "configs" / "smollm2-135m-bdlora-tp3.yaml"  # model, LoRA and batch settings of both adapters
CORPORA = {"milton": "milton", "comedies": "shakespeare_comedies"}  # adapter / column name -> data set folder
PROMPTS = ("Of Man's first disobedience, and the fruit", "Good morrow, fair cousin. What news from")
# a small workload: the speed table is a smoke-sized version of docs/benchmarks.md's, at the demo's TP and rank
BENCH_ARGS = ("--model", "smollm2", "--modes", "block_diagonal,slora,replicated,none", "--num-requests", "4",
              "--num-adapters", "2", "--prompt-len", "16,24", "--output-len", "8,8", "--warmup", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"),
                   help="where runs, samples and tables go (default runs/demo)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="demo corpora folder (default data; made if missing)")
    # 5 steps at 3e-3 leave each adapter >= 20% below every other model on its own corpus (6 at 3e-3 and 8 at 2e-3
    # gave 23-26%); the base is 34-41% above
    p.add_argument("--steps", type=int, default=5,
                   help="optimizer steps per adapter (global batch 8 x 128 tokens; default 5)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate, 1 warm-up step then cosine (default 3e-3)")
    p.add_argument("--eval-batches", type=int, default=2,
                   help="held-out micro-batches (4 x 128 tokens) per perplexity cell, from the start of each valid "
                   "file (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens per sample (default 20)")
    p.add_argument("--fresh", action="store_true",
                   help="redo the steps that write under --out-dir (data and the cached base are kept)")
    args = p.parse_args(argv)
    for flag in ("steps", "eval_batches", "max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


# ------------------------------------------------------------------------------------------------ helpers


def run(cmd: list[str], what: str, capture: Path | None = None, **env: str) -> None:
    """Run a step's command (its output passes through; also saved to `capture`); a failure ends the demo."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHON=sys.executable, **env)
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE if capture else None, text=True) as proc:
        lines = []
        for line in proc.stdout or ():
            print(line, end="", flush=True)
            lines.append(line)
    if proc.returncode:
        sys.exit(f"error: {what} failed (exit status {proc.returncode}); see its output above")
    if capture is not None:
        capture.write_text("".join(lines))


def train_overrides(args: argparse.Namespace, name: str) -> list[str]:
    """The config overrides of one adapter's run: its corpus, its folder, the demo's short schedule."""
    folder = CORPORA[name]
    return [f"data.train={args.data_dir / folder / 'train.txt'}", "data.valid=null",
            f"logging.dir={args.out_dir / name}", f"schedule.train_steps={args.steps}", "schedule.warmup_steps=1",
            f"optimizer.lr={args.lr}", "checkpoint.every=0"]


def repo_relative(path: Path) -> Path:
    """A path given relative to the caller's directory, relative to the repository when inside it."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def one_line(text: str, width: int = 110) -> str:
    """A sample on one line: line breaks shown as ' / ', cut at `width` characters."""
    flat = " / ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# ------------------------------------------------------------------------------------------------ steps


def step_data(args: argparse.Namespace) -> None:
    if (args.data_dir / "manifest.json").is_file():
        print(f"data: {args.data_dir} exists (skipped)")
        return
    run([sys.executable, "tools/prepare_data.py", "--out-dir", str(args.data_dir)], "tools/prepare_data.py")


def step_base() -> Path:
    """The TP=3 megatron checkpoint of the embedded base (converted into the project cache once)."""
    from megatron_bdlora.base_models import EMBEDDED, ensure_megatron_base, resolve_hf_base

    hf_dir = resolve_hf_base(EMBEDDED)
    meg_dir = ensure_megatron_base(hf_dir, TP)
    print(f"base: {hf_dir} (HF), {meg_dir} (megatron, TP={TP})")
    return meg_dir


def step_train(args: argparse.Namespace, name: str) -> Path:
    adapter = args.out_dir / name / "adapter"
    if (adapter / "adapter_manifest.json").is_file():
        print(f"train {name}: {adapter} exists (skipped)")
    else:
        # one thread per rank, torchrun's default, set here so that it does not print a banner about it
        run(["bash", "launch/train.sh", str(CONFIG), str(TP), *train_overrides(args, name)],
            f"training the {name} adapter",
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    metrics = (args.out_dir / name / "metrics.jsonl").read_text().splitlines()
    last = [json.loads(line) for line in metrics if line.strip()][-1]
    print(f"train {name}: {last['step']} steps, last training loss {last['loss']:.3f}")
    return adapter


def serve_and_score(info: Any, serving: Any, requests: list, params: Any, ppl: Any) -> dict[str, Any]:
    """Every rank of one spawned TP group: the mixed-batch samples, then the perplexity table (either may be None)."""
    from megatron_bdlora.mixed_batch import generate_mixed_batch
    from megatron_bdlora.perplexity import perplexity_worker

    out: dict[str, Any] = {}
    if serving is not None:
        out["samples"] = generate_mixed_batch(info, serving, requests, params)
        gc.collect()  # the serving model and its KV cache before the scoring models
    if ppl is not None:
        out["perplexity"] = perplexity_worker(info, ppl)
    return out


def step_serve_and_score(args: argparse.Namespace, meg_dir: Path, adapters: dict[str, Path]) -> tuple[dict, dict]:
    """Samples (OUT/samples.json) and the perplexity table (OUT/perplexity.json), computed together when missing."""
    from transformers import AutoTokenizer

    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_config import ServingConfig
    from megatron_bdlora.local_ranks import run_distributed
    from megatron_bdlora.perplexity import PerplexitySpec
    from megatron_bdlora.training.config import load_config

    samples_file, ppl_file = args.out_dir / "samples.json", args.out_dir / "perplexity.json"
    cfg = load_config(CONFIG, [f"logging.eval_batches={args.eval_batches}"])  # the adapters' packing and model settings
    tokenizer = AutoTokenizer.from_pretrained(meg_dir)
    rows: list[str | None] = [None, *adapters]
    requests = [(tokenizer(prompt)["input_ids"], row) for prompt in PROMPTS for row in rows]
    serving = ppl = None
    if not samples_file.is_file():
        serving = ServingConfig(megatron_dir=meg_dir, mode="block_diagonal",
                                adapters={n: str(d) for n, d in adapters.items()}, max_loras=len(adapters),
                                max_lora_rank=cfg.lora.rank, max_model_len=128, max_num_seqs=len(requests),
                                kv_cache_gb=0.05)
    if not ppl_file.is_file():
        ppl = PerplexitySpec(meg_dir, {n: str(d) for n, d in adapters.items()},
                             {n: str(args.data_dir / folder / "valid.txt") for n, folder in CORPORA.items()}, cfg)
    if serving or ppl:
        params = GenerationParams(max_tokens=args.max_new_tokens, temperature=0.0)
        result = run_distributed(serve_and_score, TP, serving, requests, params, ppl)[0]
        if serving:
            completions, widest = result["samples"]
            samples = {"max_requests_in_one_step": widest, "max_new_tokens": args.max_new_tokens, "completions": [
                {"prompt": PROMPTS[i // len(rows)], "model": c.adapter or "base", "text": c.text,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(completions)]}
            samples_file.write_text(json.dumps(samples, indent=2) + "\n")
        if ppl:
            tokens = cfg.logging.eval_batches * cfg.parallel.micro_batch_size * cfg.data.seq_length
            table = {"table": result["perplexity"], "tokens_per_cell": tokens, "tp": TP}
            ppl_file.write_text(json.dumps(table, indent=2) + "\n")
    return json.loads(samples_file.read_text()), json.loads(ppl_file.read_text())


def print_samples(samples: dict) -> None:
    print(f"\nGreedy samples ({samples['max_new_tokens']} new tokens), base + both adapters served in one mixed batch "
          f"at TP={TP} (up to {samples['max_requests_in_one_step']} requests in one engine step):")
    for prompt in PROMPTS:
        print(f"  {prompt!r}")
        for c in (c for c in samples["completions"] if c["prompt"] == prompt):
            print(f"    {c['model']:<9} {one_line(c['text'])}")


def print_perplexity(ppl: dict) -> bool:
    """Print the table and the verdict; whether each adapter is best on its own corpus."""
    from megatron_bdlora.perplexity import format_table, own_corpus_failures

    print(f"\nHeld-out perplexity at TP={TP} ({ppl['tokens_per_cell']} tokens of each valid file; "
          "* = best per column):")
    print(format_table(ppl["table"]))
    failures = own_corpus_failures(ppl["table"], {name: name for name in CORPORA})
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print("OK: each adapter is the best model on its own corpus")
    return not failures


def step_bench(args: argparse.Namespace, rank: int) -> None:
    out = args.out_dir / "bench_serving"
    text = out.with_suffix(".txt")
    print("\nServing speed, BD vs S-LoRA vs replicated vs no adapter (tools/bench_serving.py):")
    if text.is_file() and out.with_suffix(".json").is_file():
        print(text.read_text(), end="")
        return
    run([sys.executable, "tools/bench_serving.py", "--tp", str(TP), "--adapter-rank", str(rank), *BENCH_ARGS,
         "--json", str(out.with_suffix(".json")), "--plot", str(out.with_suffix(".png"))], "tools/bench_serving.py",
        capture=text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir, args.data_dir = (repo_relative(p) for p in (args.out_dir, args.data_dir))
    os.chdir(REPO)  # the commands below are the repository's (launch/, tools/, configs/)
    from megatron_bdlora.training.config import load_config

    if args.fresh:
        outputs = ["samples.json", "perplexity.json", "bench_serving.json", "bench_serving.png", "bench_serving.txt"]
        for name in [*CORPORA, *outputs]:
            path = args.out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(name: str, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        times[name] = time.perf_counter() - start
        return result

    timed("data", step_data, args)
    meg_dir = timed("base", step_base)
    adapters = {name: timed(f"train {name}", step_train, args, name) for name in CORPORA}
    samples, ppl = timed("serve + ppl", step_serve_and_score, args, meg_dir, adapters)
    print_samples(samples)
    ok = print_perplexity(ppl)
    timed("bench", step_bench, args, load_config(CONFIG).lora.rank)
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print(f"\nstep times: {steps}; total {sum(times.values()):.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
