"""lm-evaluation-harness against the server for a BD adapter, checked against `lm_eval --model hf ... peft=ADAPTER`.

    python tools/eval_lm_eval.py [--work-dir runs/lm_eval] [--adapter PEFT_DIR] [--port 8011]

Writes two small local tasks (a multiple-choice one scored by log-likelihoods, a generate_until one; no download),
starts `python -m megatron_bdlora.serve` on the embedded SmolLM2-135M-Instruct with the adapter (a random PEFT-format
BD adapter unless --adapter), runs both tasks through `--model local-completions` against it and through
`--model hf --model_args pretrained=HF_DIR,peft=ADAPTER,dtype=float32`, and checks that every document's
log-likelihoods agree to 1e-3 and the accuracies and generations are equal. Writes WORK/comparison.json; exit
status 1 on a disagreement. The same runs by hand:

    lm_eval --model local-completions --include_path WORK/tasks --tasks bdlora_local_mc,bdlora_local_gen \\
        --model_args model=bd,base_url=http://127.0.0.1:PORT/v1/completions,tokenizer=HF_DIR,tokenizer_backend=huggingface
    lm_eval --model hf --include_path WORK/tasks --tasks bdlora_local_mc,bdlora_local_gen \\
        --model_args pretrained=HF_DIR,peft=ADAPTER,dtype=float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag documented for --help."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/lm_eval"), metavar="DIR",
                   help="where the tasks, the adapter, the server log and comparison.json go (default: runs/lm_eval)")
    p.add_argument("--adapter", type=Path, metavar="PEFT_DIR",
                   help="a PEFT-format adapter of SmolLM2-135M-Instruct (default: a random BD adapter, rank 6, "
                        "3 blocks, written under --work-dir)")
    p.add_argument("--port", type=int, default=8011, help="the server's port on 127.0.0.1 (default: 8011)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks only: never reach for the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # lazy: torch, transformers and lm-eval take seconds, so --help and bad flags answer at once
    from megatron_bdlora.base_models import resolve_hf_base
    from megatron_bdlora.bench import lm_eval_check as check

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tasks = check.write_tasks(work / "tasks")
    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    adapter = args.adapter.resolve() if args.adapter else check.make_adapter(hf_dir, work / "adapter_peft")
    with check.served(hf_dir, adapter, args.port, work / "server.log") as url:
        server = check.run_lm_eval(*check.model_args("server", hf_dir, adapter, url), tasks)
    hf = check.run_lm_eval(*check.model_args("hf", hf_dir, adapter), tasks)
    result = check.compare(server, hf)
    (work / "comparison.json").write_text(json.dumps({**asdict(result), "ok": result.ok}, indent=1))
    print(f"MC accuracy: server {result.accuracy[0]:.4f}, transformers + PEFT {result.accuracy[1]:.4f}; largest "
          f"log-likelihood difference {result.max_loglikelihood_diff:.2e}")
    for problem in result.problems:
        print("MISMATCH:", problem)
    print("OK: the server's lm-eval results equal transformers + PEFT's" if result.ok else
          f"{len(result.problems)} disagreement(s); see {work / 'comparison.json'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
