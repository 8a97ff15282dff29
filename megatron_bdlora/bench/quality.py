"""Fine-tune LoRA and BD-LoRA adapters on the demo tasks, then score every adapter with transformers + PEFT.

    python tools/compare_quality.py --out docs/quality.json [--steps S] [--seeds 0 1] [--tasks ...] \\
        [--work-dir runs/quality]

The paper's quality claim in miniature: on SmolLM2-135M-Instruct at TP=3 (BD with nblocks=3), LoRA at rank r
(mode replicated), BD-LoRA at the parameter-matched rank and BD-LoRA at twice that rank, with the same data,
steps, learning rate and alpha = 2 x rank, one adapter per task and seed. Training goes through our trainer
(`python -m torch.distributed.run --nproc_per_node TP -m megatron_bdlora.train`, which trains the LoRA factors
only); scoring does not touch our model code: each native adapter is
exported to a PEFT directory, loaded with `PeftModel.from_pretrained` onto the Hugging Face base model and merged
(PEFT's own delta weights; --no-merge scores through PEFT's unmerged layers instead).

Metrics: token-level perplexity of the task's valid file (EOS-joined documents cut into fixed windows, the same
windows for every method, evenly spaced over the file, capped at --eval-windows) for the LM tasks; exact-match
accuracy of the greedy answer (HF `generate`, left-padded batches, chat template with the generation prompt) on
the first --eval-records records of which_play's valid file. The base model without an adapter is scored too.

Each finished run stores `<work-dir>/<task>/<method>/seed<k>/result.json`; a rerun with the same settings skips
it, so an interrupted comparison resumes where it stopped. tools/compare_quality.py is the command line of `main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_bdlora.base_models import resolve_hf_base
from megatron_bdlora.bench.environment import machine, package_versions, repo_root
from megatron_bdlora.bench.plots import pyplot, save_figure
from megatron_bdlora.bench.results import write_json
from megatron_bdlora.checkpoint.peft import export_peft_directory
from megatron_bdlora.param_count import count_parameters, match_bd_rank
from megatron_bdlora.training.config import load_config

ROOT = repo_root()  # CONFIG and the tasks' data files are relative to the checkout; training runs there

CONFIG = "configs/smollm2-135m-bdlora-tp3.yaml"
BASE = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: its files and how its adapter is scored."""

    name: str
    title: str  # column heading
    train: str
    valid: str
    format: str  # text | chat
    metric: str  # ppl (lower is better) | accuracy (higher is better)
    chance: float | None = None  # accuracy of a uniform guess among the allowed answers


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("comedies", "comedies ppl", "data/shakespeare_comedies/train.txt", "data/shakespeare_comedies/valid.txt",
             "text", "ppl"),
        Task("milton", "Milton ppl", "data/milton/train.txt", "data/milton/valid.txt", "text", "ppl"),
        Task("which_play", "which_play acc", "data/which_play/train.jsonl", "data/which_play/valid.jsonl",
             "chat", "accuracy", chance=0.25),
    )
}


@dataclass(frozen=True)
class Method:
    """An adapter configuration under comparison, with its size relative to LoRA."""

    name: str  # directory and JSON key, e.g. "bd-r12"
    label: str  # table label
    mode: str  # replicated (plain LoRA) | block_diagonal
    rank: int
    nblocks: int | None
    params: int
    ratio: float  # params / LoRA params


# ------------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command line, every flag documented."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file with every run, the summary and the exact commands")
    p.add_argument("--plot", default=None, help="PNG of metric vs trainable parameters (None: --out with .png)")
    p.add_argument("--work-dir", default="runs/quality",
                   help="run directories (training logs, adapters, per-run results)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks to fine-tune and score")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                   help="training seeds (LoRA init and data order); mean and std are over these")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (the same for every method)")
    p.add_argument("--warmup", type=int, default=1, help="linear warm-up steps before the cosine decay")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the same for every method)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r; BD ranks are the matched rank and twice it")
    p.add_argument("--tp", type=int, default=3,
                   help="tensor-parallel degree of training (= BD nblocks, = ranks launched)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--seq-length", type=int, default=128, help="training sequence length (which_play records need 128)")
    p.add_argument("--eval-windows", type=int, default=48, help="perplexity windows per LM valid file (evenly spaced)")
    p.add_argument("--eval-length", type=int, default=128, help="tokens scored per perplexity window")
    p.add_argument("--eval-records", type=int, default=200,
                   help="which_play valid records scored (the file's first ones)")
    p.add_argument("--eval-batch", type=int, default=16, help="sequences per evaluation forward / generate call")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens generated per which_play answer")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="score through PEFT's unmerged LoRA layers instead of merge_and_unload() "
                        "(slower, same numbers)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the scoring process")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments; argparse reports bad values and exits 2."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject settings that cannot give a comparison, before any training starts."""
    positive = ("steps", "lr", "lora_rank", "tp", "global_batch", "micro_batch", "seq_length", "eval_windows",
                "eval_length", "eval_records", "eval_batch", "max_new_tokens", "threads")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or args.warmup > args.steps:
        raise ValueError(f"--warmup must be in [0, --steps={args.steps}], got {args.warmup}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError(f"--tasks must be distinct, got {args.tasks}")
    if args.global_batch % args.micro_batch:
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")


# ------------------------------------------------------------------------------------------------- methods


def comparison_methods(hf_config: Any, targets: list[str], nblocks: int, lora_rank: int) -> list[Method]:
    """LoRA at lora_rank, BD at the parameter-matched rank, BD at twice the matched rank (twice its parameters)."""
    lora = count_parameters(hf_config, targets, "replicated", lora_rank)
    matched = match_bd_rank(hf_config, targets, nblocks, lora_rank)
    methods = [Method(f"lora-r{lora_rank}", f"LoRA r={lora_rank}", "replicated", lora_rank, None, lora, 1.0)]
    for rank, what in ((matched, "matched"), (2 * matched, "2x matched")):
        n = count_parameters(hf_config, targets, "block_diagonal", rank, nblocks)
        methods.append(Method(f"bd-r{rank}", f"BD-LoRA r={rank} ({what})", "block_diagonal", rank, nblocks, n,
                              n / lora))
    return methods


def train_overrides(args: argparse.Namespace, task: Task, method: Method, seed: int, log_dir: Path) -> list[str]:
    """`key.sub=value` overrides of CONFIG for one run: everything but the method and the seed is shared."""
    return [
        f"lora.mode={method.mode}",
        f"lora.rank={method.rank}",
        f"lora.alpha={2 * method.rank}",
        f"lora.nblocks={'null' if method.nblocks is None else method.nblocks}",
        f"parallel.tp={args.tp}",
        f"parallel.micro_batch_size={args.micro_batch}",
        f"parallel.global_batch_size={args.global_batch}",
        f"optimizer.lr={args.lr}",
        f"schedule.train_steps={args.steps}",
        f"schedule.warmup_steps={args.warmup}",
        f"data.train={task.train}",
        f"data.valid={task.valid}",
        f"data.format={task.format}",
        f"data.seq_length={args.seq_length}",
        "checkpoint.every=0",
        "logging.progress=false",
        "logging.eval_batches=1",
        f"logging.dir={log_dir}",
        f"seed={seed}",
    ]


def train_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The trainer launch (torchrun through the current interpreter, so the venv is used)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.tp),
            "-m", "megatron_bdlora.train", "--config", CONFIG, *overrides]


# ------------------------------------------------------------------------------------------------- training


def read_metrics(log_dir: Path) -> list[dict[str, Any]]:
    """The trainer's per-step records (metrics.jsonl), empty when there is none."""
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_complete(log_dir: Path, steps: int) -> bool:
    """A finished run has its final adapter and a metrics line for its last step."""
    records = read_metrics(log_dir)
    return (log_dir / "adapter" / "adapter_manifest.json").is_file() and bool(records) and records[-1]["step"] == steps


def train(args: argparse.Namespace, command: list[str], log_dir: Path) -> float:
    """Run the trainer (from scratch: a partial earlier attempt is removed); returns wall seconds, 0 if reused."""
    if training_complete(log_dir, args.steps):
        return 0.0
    if log_dir.exists():
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(log_dir / "train.log", "w") as log:
        rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not training_complete(log_dir, args.steps):
        tail = "\n".join((log_dir / "train.log").read_text().splitlines()[-20:])
        raise RuntimeError(f"training failed (exit {rc}) in {log_dir}; last log lines:\n{tail}")
    shutil.rmtree(log_dir / "checkpoints", ignore_errors=True)  # DeepSpeed state, ~0.5 GB a run; the adapter stays
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- evaluation


def lm_windows(path: Path, tokenizer: Any, length: int) -> Any:
    """All [n, length + 1] windows of a text file's EOS-joined token stream, overlapping by one token.

    Documents are split at form feeds as the data README defines them; this is the trainer's packing, written
    out here so that the evaluation does not import it (its first windows are the trainer's valid examples).
    """
    docs = [d.strip("\n") for d in path.read_text(encoding="utf-8").split("\f") if d.strip()]
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    n = (len(stream) - 1) // length
    if n == 0:
        raise ValueError(f"{path}: {len(stream)} tokens, fewer than one window of {length + 1}")
    return torch.tensor([stream[i * length : i * length + length + 1] for i in range(n)])  # [n, length+1]


def spaced_indices(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n) (all of them when count >= n)."""
    if count >= n:
        return list(range(n))
    return [round(i * (n - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def window_nlls(model: Any, windows: Any, batch: int) -> list[float]:
    """Mean next-token negative log-likelihood of each window (all windows have the same number of targets)."""
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            w = windows[start : start + batch]  # [b, L+1]
            logits = model(input_ids=w[:, :-1]).logits.float()  # [b, L, vocab]
            nll = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")  # [b, L]
            out += nll.mean(dim=1).tolist()
    return out


def which_play_records(path: Path, count: int) -> list[tuple[str, str]]:
    """(prompt, answer) of the file's first `count` records."""
    out = []
    for line in path.read_text().splitlines()[:count]:
        messages = json.loads(line)["messages"]
        user = [m["content"] for m in messages if m["role"] == "user"]
        answer = [m["content"] for m in messages if m["role"] == "assistant"]
        out.append((user[-1], answer[-1]))
    return out


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], batch: int, max_new_tokens: int) -> list[str]:
    """Stripped greedy completions of single-turn chats (chat template + generation prompt, left padding).

    Prompts are batched in order of length (less padding); answers come back in the prompts' order.
    """
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))
    answers: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, enc["input_ids"].shape[1] :]  # [b, new]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


class Evaluator:
    """Scores the HF base model, alone or with a PEFT adapter, on one task; the eval data are built once."""

    def __init__(self, args: argparse.Namespace, hf_dir: Path) -> None:
        # lazy (transformers and peft, here and in load): seconds to import, and tools/compare_quality.py imports this
        # module before it parses its flags
        from transformers import AutoTokenizer

        self.args, self.hf_dir = args, hf_dir
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._data: dict[str, Any] = {}

    def settings(self, task: Task) -> dict[str, Any]:
        """What the score of a task depends on besides the adapter (a cached result must match it)."""
        a = self.args
        if task.metric == "ppl":
            return {"valid": task.valid, "windows": a.eval_windows, "length": a.eval_length, "merge": a.merge}
        return {"valid": task.valid, "records": a.eval_records, "max_new_tokens": a.max_new_tokens, "merge": a.merge}

    def _task_data(self, task: Task) -> Any:
        if task.name not in self._data:
            if task.metric == "ppl":
                windows = lm_windows(ROOT / task.valid, self.tokenizer, self.args.eval_length)
                self._data[task.name] = (windows, spaced_indices(len(windows), self.args.eval_windows))
            else:
                self._data[task.name] = which_play_records(ROOT / task.valid, self.args.eval_records)
        return self._data[task.name]

    def load(self, peft_dir: Path | None) -> Any:
        """A fresh float32 HF base model with the PEFT adapter attached (merged into the weights unless --no-merge)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=torch.float32)
        if peft_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(peft_dir))
            if self.args.merge:
                model = model.merge_and_unload()
        return model.eval()

    def score(self, task: Task, peft_dir: Path | None, check_windows: int = 0) -> dict[str, Any]:
        """The task's metric and its ingredients; `check_windows` > 0 also scores the file's first windows."""
        model = self.load(peft_dir)
        a = self.args
        if task.metric == "ppl":
            windows, idx = self._task_data(task)
            scored = sorted(set(idx) | set(range(min(check_windows, len(windows)))))
            nll = dict(zip(scored, window_nlls(model, windows[scored], a.eval_batch)))
            mean = statistics.fmean(nll[i] for i in idx)  # windows hold equally many targets: the token mean
            result = {"ppl": math.exp(mean), "nll": mean, "tokens": len(idx) * a.eval_length, "windows": idx,
                      "windows_in_file": len(windows), "window_length": a.eval_length,
                      "window_nll": [nll[i] for i in idx]}
            if check_windows:
                result["nll_first_windows"] = statistics.fmean(nll[i] for i in range(check_windows))
            return result
        records = self._task_data(task)
        answers = greedy_answers(model, self.tokenizer, [p for p, _ in records], a.eval_batch, a.max_new_tokens)
        correct = [ans == gold for ans, (_, gold) in zip(answers, records)]
        return {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "records": len(records),
                "gold_counts": dict(Counter(g for _, g in records)),
                "answer_counts": dict(Counter(answers).most_common(8)),
                "answers": answers}


# ------------------------------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: list[dict[str, Any]], methods: list[Method], tasks: list[Task]) -> list[dict[str, Any]]:
    """One row per (method, task) that has runs: metric mean and std over seeds, and the seeds' values."""
    rows = []
    for m in methods:
        for t in tasks:
            vals = sorted((r["seed"], r["metrics"][t.metric]) for r in runs
                          if r["method"] == m.name and r["task"] == t.name)
            if not vals:
                continue
            mean, std = mean_std([v for _, v in vals])
            rows.append({"method": m.name, "label": m.label, "params": m.params, "ratio": m.ratio, "task": t.name,
                         "metric": t.metric, "mean": mean, "std": std, "n": len(vals),
                         "seeds": [s for s, _ in vals], "values": [v for _, v in vals]})
    return rows


def format_value(metric: str, mean: float, std: float | None) -> str:
    """`mean ± std` in the metric's unit (accuracy in percent); no ± for a single value."""
    if metric == "accuracy":
        mean, std, unit, digits = 100 * mean, None if std is None else 100 * std, "%", 1
    else:
        unit, digits = "", 2
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    return text + unit


def format_table(summary: list[dict[str, Any]], methods: list[Method], tasks: list[Task],
                 base: dict[str, dict[str, Any]]) -> str:
    """Markdown table: base model, then one row per method (params, ratio to LoRA, each task's metric)."""
    head = ["method", "trainable params", "ratio to LoRA"] + [t.title for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = ["base model (no adapter)", "0", "–"]
    for t in tasks:
        cells.append(format_value(t.metric, base[t.name][t.metric], None) if t.name in base else "–")
    lines.append("| " + " | ".join(cells) + " |")
    by_key = {(row["method"], row["task"]): row for row in summary}
    for m in methods:
        cells = [m.label, f"{m.params:,}", f"{m.ratio:.3f}"]
        for t in tasks:
            row = by_key.get((m.name, t.name))
            cells.append(format_value(t.metric, row["mean"], row["std"]) if row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], methods: list[Method], tasks: list[Task], base: dict[str, dict[str, Any]],
         path: Path, caption: str) -> None:
    """Each task's metric vs trainable parameters, per method with error bars over seeds; base as a line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    styles = {"replicated": dict(marker="o", color="tab:blue"), "block_diagonal": dict(marker="s", color="tab:orange")}
    for ax, t in zip(axes[0], tasks):
        scale = 100 if t.metric == "accuracy" else 1
        for mode, name in (("replicated", "LoRA"), ("block_diagonal", "BD-LoRA")):
            rows = sorted((r for r in summary if r["task"] == t.name and r["method"] in
                           {m.name for m in methods if m.mode == mode}), key=lambda r: r["params"])
            if rows:
                ax.errorbar([r["params"] for r in rows], [scale * r["mean"] for r in rows],
                            yerr=[scale * (r["std"] or 0.0) for r in rows], capsize=4, linestyle="-", label=name,
                            **styles[mode])
                for r in rows:
                    ax.scatter([r["params"]] * r["n"], [scale * v for v in r["values"]], s=10, alpha=0.4,
                               color=styles[mode]["color"])
        if t.name in base:
            ax.axhline(scale * base[t.name][t.metric], color="gray", linestyle="--", label="base model")
        if t.chance is not None:
            ax.axhline(scale * t.chance, color="gray", linestyle=":", label="chance")
        ax.set_xlabel("trainable adapter parameters")
        ax.set_ylabel(t.title + (" (%)" if t.metric == "accuracy" else " (lower is better)"))
        ax.set_title(t.name)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(6, 6))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------------- the comparison


def cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A stored result made with exactly these settings; an error if one exists with other settings."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != key:
        raise SystemExit(f"error: {path} was made with other settings ({data.get('key')} != {key}); "
                         "delete it or use another --work-dir")
    return data


def run_one(args: argparse.Namespace, evaluator: Evaluator, task: Task, method: Method, seed: int,
            work: Path) -> dict[str, Any]:
    """Train (unless done), export to PEFT, score; the stored result makes a rerun skip all of it."""
    run_dir = work / task.name / method.name / f"seed{seed}"
    log_dir = run_dir / "train"
    overrides = train_overrides(args, task, method, seed, log_dir)
    key = {"overrides": [o for o in overrides if not o.startswith("logging.dir=")], "eval": evaluator.settings(task)}
    done = cached(run_dir / "result.json", key)
    if done is not None:
        return done
    command = train_command(args, overrides)
    train_s = train(args, command, log_dir)
    t0 = time.perf_counter()
    peft_dir = export_peft_directory(log_dir / "adapter", run_dir / "peft", base_model_name=BASE, overwrite=True)
    export_s = time.perf_counter() - t0
    history = read_metrics(log_dir)
    trainer_valid = history[-1].get("valid_loss")
    check = args.micro_batch if task.metric == "ppl" else 0  # the trainer's valid examples (eval_batches=1)
    t0 = time.perf_counter()
    metrics = evaluator.score(task, peft_dir, check_windows=check)
    eval_s = time.perf_counter() - t0
    result = {
        "key": key, "task": task.name, "method": method.name, "seed": seed,
        "mode": method.mode, "rank": method.rank, "alpha": 2 * method.rank, "nblocks": method.nblocks,
        "params": method.params,
        "config": load_config(ROOT / CONFIG, overrides).to_dict(),
        "command": shlex.join(command),
        "losses": [r["loss"] for r in history],
        "final_train_loss": history[-1]["loss"],
        "trainer_valid_loss": trainer_valid,
        "metrics": metrics,
        "timings": {"train_s": train_s, "export_s": export_s, "eval_s": eval_s,
                    "train_tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in history)},
    }
    if check and trainer_valid is not None:  # does the PEFT path reproduce our trainer's valid loss?
        result["agreement"] = {"windows": check, "trainer_valid_loss": trainer_valid,
                               "peft_valid_loss": metrics["nll_first_windows"],
                               "abs_diff": abs(trainer_valid - metrics["nll_first_windows"])}
    write_json(run_dir / "result.json", result)
    return result


def machine_record() -> dict[str, Any]:
    """Where the numbers come from (the result's "machine")."""
    host, versions = machine(), package_versions(("transformers", "peft"))
    return {"platform": host["platform"], "processor": platform.processor() or platform.machine(),
            "cpu_count": host["cpu_count"], "python": host["python"], "torch": torch.__version__,
            "transformers": versions["transformers"], "peft": versions["peft"]}


def main(argv: list[str] | None = None) -> int:
    """Run the whole comparison (resuming finished runs), write the JSON and the plot, print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work_dir).resolve()
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    tasks = [TASKS[name] for name in args.tasks]
    hf_dir = resolve_hf_base(BASE)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    targets = load_config(ROOT / CONFIG).lora.targets
    methods = comparison_methods(hf_config, targets, args.tp, args.lora_rank)
    evaluator = Evaluator(args, hf_dir)

    base: dict[str, dict[str, Any]] = {}
    base_eval_s: dict[str, float] = {}
    runs: list[dict[str, Any]] = []
    jobs = [(t, None, None) for t in tasks] + [(t, m, s) for t in tasks for s in args.seeds for m in methods]
    bar = tqdm(jobs, desc="quality", unit="job", dynamic_ncols=True)
    for task, method, seed in bar:
        bar.set_postfix_str(f"{task.name} {'base' if method is None else method.name} seed={seed}")
        if method is None:
            path, key = work / "base" / f"{task.name}.json", {"eval": evaluator.settings(task)}
            done = cached(path, key)
            if done is None:
                t0 = time.perf_counter()
                done = {"key": key, "task": task.name, "metrics": evaluator.score(task, None)}
                done["timings"] = {"eval_s": time.perf_counter() - t0}
                write_json(path, done)
            base[task.name], base_eval_s[task.name] = done["metrics"], done["timings"]["eval_s"]
            msg = f"base {task.name}: {task.metric} {done['metrics'][task.metric]:.4f}"
        else:
            r = run_one(args, evaluator, task, method, seed, work)
            runs.append(r)
            tm = r["timings"]
            msg = (f"{task.name} {method.name} seed {seed}: loss {r['losses'][0]:.3f} -> {r['final_train_loss']:.3f}, "
                   f"{task.metric} {r['metrics'][task.metric]:.4f} "
                   f"(train {tm['train_s']:.0f} s, eval {tm['eval_s']:.0f} s)")
        tqdm.write(msg)
    bar.close()

    summary = summarize(runs, methods, tasks)
    table = format_table(summary, methods, tasks, base)
    caption = (f"SmolLM2-135M-Instruct, TP={args.tp}, {args.steps} steps x {args.global_batch} x "
               f"{args.seq_length} tokens, "
               f"lr {args.lr:g}, seeds {' '.join(map(str, args.seeds))}; error bars: std over seeds")
    plot(summary, methods, tasks, base, plot_path, caption)
    write_json(out, {
        "command": shlex.join(["python", "tools/compare_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_record(),
        "settings": vars(args),
        "methods": [asdict(m) for m in methods],
        "base": base,
        "summary": summary,
        "table": table,
        "runs": runs,
        "wall_s_this_invocation": time.perf_counter() - start,  # cached runs cost nothing here; the sums below do
        "train_s_all_runs": sum(r["timings"]["train_s"] for r in runs),
        "eval_s_all_runs": sum(r["timings"]["eval_s"] for r in runs),
        "eval_s_base": sum(base_eval_s.values()),
    })
    print(table)
    print(f"wrote {out} and {plot_path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
