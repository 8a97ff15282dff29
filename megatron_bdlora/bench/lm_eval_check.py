"""lm-evaluation-harness against the server for a BD adapter, checked against lm-eval's own transformers + PEFT run.

Two small LOCAL tasks (written as lm-eval task YAMLs over JSON-lines files: nothing is downloaded) are run twice:
`--model local-completions` against `python -m megatron_bdlora.serve` (the embedded SmolLM2 with a PEFT-format BD
adapter), and `--model hf --model_args pretrained=HF_DIR,peft=ADAPTER,dtype=float32`. A multiple-choice task is
scored by log-likelihoods (the server's echo + logprobs, lists of token-id prompts per request), a generate_until
task by greedy generations (stop strings); every document's log-likelihoods must agree to `LOGLIKELIHOOD_TOL`, the
accuracies and the generations must be equal. tools/eval_lm_eval.py is the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

LOGLIKELIHOOD_TOL = 1e-3  # per (document, choice): float32 on both sides, different kernels and batch shapes
MC_TASK, GEN_TASK = "bdlora_local_mc", "bdlora_local_gen"
ADAPTER_NAME = "bd"
START_TIMEOUT_S = 600

# (question, choices, index of the answer): general knowledge a 135M model gets partly right, so accuracy is neither
# 0 nor 1 and a wrong log-likelihood shows in it
_FACTS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("The largest planet in the solar system is", ["Mars", "Jupiter", "Venus"], 1),
    ("Water freezes at a temperature of", ["0 degrees Celsius", "50 degrees Celsius", "100 degrees Celsius"], 0),
    ("The opposite of hot is", ["loud", "cold", "tall"], 1),
    ("A week has", ["five days", "ten days", "seven days"], 2),
    ("The color of the sky on a clear day is", ["green", "blue", "red"], 1),
    ("Bees make", ["milk", "honey", "silk"], 1),
    ("The sun rises in the", ["east", "west", "north"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("The chemical symbol for gold is", ["Au", "Ag", "Fe"], 0),
    ("A baby cat is called a", ["puppy", "kitten", "calf"], 1),
    ("The author of Hamlet is", ["Shakespeare", "Dickens", "Tolstoy"], 0),
    ("Ice is the solid form of", ["air", "water", "sand"], 1),
    ("The fastest land animal is the", ["cheetah", "snail", "tortoise"], 0),
    ("Paper is made from", ["glass", "wood", "iron"], 1),
    ("The number of continents on Earth is", ["seven", "three", "twelve"], 0),
    ("The capital of Japan is", ["Beijing", "Seoul", "Tokyo"], 2),
    ("A triangle has", ["three sides", "four sides", "six sides"], 0),
    ("The planet we live on is", ["Earth", "Neptune", "Pluto"], 0),
    ("Fish breathe through their", ["lungs", "gills", "skin"], 1),
    ("The boiling point of water at sea level is", ["100 degrees Celsius", "10 degrees Celsius",
                                                    "1000 degrees Celsius"], 0),
    ("A year has", ["twelve months", "nine months", "twenty months"], 0),
    ("The tallest animal is the", ["giraffe", "mouse", "rabbit"], 0),
    ("The main language of Brazil is", ["Spanish", "Portuguese", "French"], 1),
]
_PROMPTS = [  # generate_until: greedy text up to a newline
    ("Q: What is the capital of Italy?\nA:", "Rome"), ("Q: How many legs does a spider have?\nA:", "Eight"),
    ("Q: What colour is grass?\nA:", "Green"), ("Q: Who wrote Romeo and Juliet?\nA:", "Shakespeare"),
    ("Q: What is 3 times 3?\nA:", "9"), ("Q: What do cows drink?\nA:", "Water"),
    ("Q: What is the largest ocean?\nA:", "Pacific"), ("Q: Which animal says meow?\nA:", "A cat"),
    ("List three fruits:", "apple"), ("The first month of the year is", "January"),
    ("Once upon a time", ""), ("def square(x):", "return x * x"),
]


@dataclass(frozen=True)
class Comparison:
    """How the two runs compare: the largest log-likelihood difference and the disagreements found."""

    max_loglikelihood_diff: float
    accuracy: tuple[float, float]  # (server, hf)
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def write_tasks(directory: Path) -> Path:
    """The two local tasks (JSON-lines data and lm-eval YAMLs) under `directory`, for `--include_path`."""
    directory.mkdir(parents=True, exist_ok=True)
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in _FACTS]
    gen = [{"prompt": p, "target": t} for p, t in _PROMPTS]
    for name, docs in (("mc", mc), ("gen", gen)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        MC_TASK: {**common, "dataset_kwargs": {"data_files": {"test": str(directory / "mc.jsonl")}},
                  "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                  "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
        GEN_TASK: {**common, "dataset_kwargs": {"data_files": {"test": str(directory / "gen.jsonl")}},
                   "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False,
                                         "temperature": 0.0},
                   "metric_list": [{"metric": "exact_match"}]},
    }
    for task, config in tasks.items():  # JSON is YAML: no YAML writer needed
        (directory / f"{task}.yaml").write_text(json.dumps({"task": task, **config}, indent=1))
    return directory


def make_adapter(hf_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A PEFT-format BD adapter (rank 6, 3 blocks, random factors that visibly change the outputs) for `hf_dir`."""
    from megatron_bdlora.bench.workload import write_random_adapter
    from megatron_bdlora.checkpoint.peft import export_peft_directory
    from megatron_bdlora.config import LoRASettings

    hf_config = json.loads((hf_dir / "config.json").read_text())
    native = out_dir.with_name(out_dir.name + "_native")
    write_random_adapter(native, hf_config, LoRASettings(rank=6, alpha=12, nblocks=3), tp=1, seed=seed, b_std=0.02)
    return export_peft_directory(native, out_dir, overwrite=True)


@contextlib.contextmanager
def served(hf_dir: Path, adapter_dir: Path, port: int, log_path: Path) -> Iterator[str]:
    """`python -m megatron_bdlora.serve` (one rank) on 127.0.0.1:port for the base and the adapter; its URL while
    it runs, its output in log_path; stopped with SIGTERM after."""
    from megatron_bdlora.local_ranks import free_port

    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "megatron_bdlora.serve", "--megatron-dir", str(hf_dir), "--mode", "block_diagonal",
           "--adapter", f"{ADAPTER_NAME}={adapter_dir}", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-gb", "0.2"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def copy_output() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("serving on "):
                    ready.set()

        threading.Thread(target=copy_output, daemon=True).start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready.wait(0.5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start (see {log_path})")
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def model_args(kind: str, hf_dir: Path, adapter_dir: Path, url: str | None = None) -> tuple[str, str]:
    """(lm-eval --model, --model_args) for the server ("server") or for transformers + PEFT ("hf")."""
    if kind == "server":
        return "local-completions", (f"model={ADAPTER_NAME},base_url={url}/v1/completions,tokenizer={hf_dir},"
                                     "tokenizer_backend=huggingface,batch_size=8,max_length=512")
    return "hf", f"pretrained={hf_dir},peft={adapter_dir},dtype=float32,device=cpu,batch_size=1"


def run_lm_eval(model: str, args: str, tasks_dir: Path) -> dict[str, Any]:
    """lm-eval's simple_evaluate on both local tasks, with every document's outputs (log_samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=[MC_TASK, GEN_TASK],
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True)


def per_document(results: dict[str, Any]) -> tuple[list[list[float]], list[str], float]:
    """(log-likelihood of each choice of each MC document, each generation, MC accuracy), in document order."""
    samples = {task: sorted(results["samples"][task], key=lambda s: s["doc_id"]) for task in (MC_TASK, GEN_TASK)}
    loglikelihoods = [[float(r[0][0]) for r in s["resps"]] for s in samples[MC_TASK]]
    generations = [s["filtered_resps"][0] for s in samples[GEN_TASK]]
    return loglikelihoods, generations, float(results["results"][MC_TASK]["acc,none"])


def compare(server: dict[str, Any], hf: dict[str, Any], tol: float = LOGLIKELIHOOD_TOL) -> Comparison:
    """The server's run against transformers + PEFT's: log-likelihoods within tol, equal accuracy and texts."""
    ours, theirs = per_document(server), per_document(hf)
    problems, worst = [], 0.0
    for doc, (a, b) in enumerate(zip(ours[0], theirs[0], strict=True)):
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        worst = max(worst, diff)
        if diff > tol:
            problems.append(f"{MC_TASK} document {doc}: log-likelihoods {a} vs {b} (differ by {diff:.2e} > {tol})")
    for doc, (a, b) in enumerate(zip(ours[1], theirs[1], strict=True)):
        if a != b:
            problems.append(f"{GEN_TASK} document {doc}: generated {a!r} vs {b!r}")
    if ours[2] != theirs[2]:
        problems.append(f"{MC_TASK} accuracy {ours[2]} vs {theirs[2]}")
    return Comparison(worst, (ours[2], theirs[2]), tuple(problems))
