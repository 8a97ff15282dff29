"""Training on a GPU: the "training" part of the prepared GPU check (megatron_bdlora/bench/gpu_check.py).

A few BD-LoRA steps of the trainer itself (`training.loop.Trainer.train_step`, what `megatron_bdlora.train` runs: the
megatron model at TP=1, DeepSpeed ZeRO-1 over a torch AdamW, the mean token loss of each global batch accumulated
over micro-batches) on a small random Llama, in this process on the device `init_parallel` picks (cuda:LOCAL_RANK
with a GPU, else the CPU), first in float32 and then in bfloat16:

- float32, TF32 off: the accumulated gradients of steps 1 and 2 (written by `logging.dump_steps`, as
  tests/test_train_gradients.py reads them; step 1 has B = 0, so only B has a gradient, step 2 both factors) equal
  transformers + PEFT's float64 gradient of the same global batch's mean token loss, computed from the run's own
  dumped weights (relative error <= GRAD_RTOL), and so do the logged loss and gradient norm;
- bfloat16: every step's loss is finite and step 1's is within BF16_LOSS_RTOL of float32's (both start from the same
  weights and batch); the losses of all steps are reported, with no threshold on how they move.
Step times (the device synchronised around each step) and tokens/s are measured for both.

Everything is made in memory or in a temporary directory (random base weights, token data with prompt-like masks so
that micro-batches differ in loss tokens): the GPU machine has no model files and no network, and may lack `datasets`
(the trainer reads the examples as `training.data.load_examples` returns them, without it).
smoke=True runs the same code on the CPU at tiny sizes inside the test suite, so the part cannot rot between GPU
windows.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_bdlora.bench.gpu_serving import exact_float32
from megatron_bdlora.bench.peft_reference import mean_token_loss_gradients
from megatron_bdlora.bench.report import PartResult
from megatron_bdlora.bench.workload import single_process_group
from megatron_bdlora.checkpoint.adapters import load_native
from megatron_bdlora.checkpoint.hf import convert_hf_to_megatron
from megatron_bdlora.training.config import (
    CheckpointSection,
    DataSection,
    DeepSpeedSection,
    LoggingSection,
    LoRASection,
    ModelSection,
    OptimizerSection,
    ParallelSection,
    ScheduleSection,
    TrainConfig,
    batch_layout,
    check_config,
)
from megatron_bdlora.training.data import GlobalBatchSampler, collate
from megatron_bdlora.training.loop import PreparedRun, Trainer

NAME = "training"
SEED = 1234
# float32 through the model against float64: tests/test_train_gradients.py's bound (it measured 3-4e-7 on CPU); a
# wrong loss scale errs by tens of percent
GRAD_RTOL = 1e-5
BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 significand bits)
# bf16 vs float32 on the same weights and batch: the project's bf16 bound, 4 unit roundoffs (tests/test_model.py
# holds bf16 logits and LoRA gradients to it); the step-1 loss, a mean over the batch, is held to the same
BF16_LOSS_RTOL = 4 * BF16_U
DUMP_STEPS = (1, 2)  # the float32 steps checked against the reference
ZERO_STAGE = 1  # the shipped configs' stage
LORA = dict(mode="block_diagonal", rank=8, alpha=16.0, nblocks=2)  # 2 packed blocks per factor at TP=1
LR = 3e-3


@dataclass(frozen=True)
class Sizes:
    """Model and batch of one run: Llama widths, then global batch = micro x accumulation sequences of seq_length."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


GPU_SIZES = Sizes(512, 1536, 8, 4, 4, 1000, 256, 2, 8, steps=8)  # seconds on a GPU; 4 micro-batches a step
SMOKE_SIZES = Sizes(64, 128, 4, 2, 2, 250, 32, 1, 4, steps=3)  # seconds on a CPU; vocab 250: padding exercised


class Examples:
    """Training examples held in memory, read as the trainer reads `training.data.load_examples`' dataset:
    `len()` and `examples[indices]` -> {column: tensor [len(indices), seq_length]}."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {name: t[list(indices)] for name, t in self.columns.items()}


def make_examples(sizes: Sizes, seed: int = SEED) -> Examples:
    """Two global batches of sequences x_t = (start + stride * t) mod vocab (something to learn), each with a random
    prompt of 1 .. seq/2 targets that do not count (as chat data): micro-batches differ in loss tokens, so a gradient
    averaged per micro-batch instead of over the global batch's loss tokens would differ from the reference."""
    g = torch.Generator().manual_seed(seed)
    n, s, v = 2 * sizes.global_batch_size, sizes.seq_length, sizes.vocab_size
    start = torch.randint(0, v, (n, 1), generator=g)
    stride = torch.randint(1, 8, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(s + 1)) % v  # [n, s + 1]
    prompt = torch.randint(1, s // 2 + 1, (n, 1), generator=g)
    loss_mask = (torch.arange(s)[None] >= prompt).to(torch.float32)  # [n, s]
    return Examples(input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask)


def write_base(root: Path, sizes: Sizes, seed: int = SEED) -> tuple[Path, Path, dict]:
    """A seeded random Llama as a Hugging Face directory and its megatron TP=1 conversion: (hf_dir, megatron_dir,
    HF config). Weights N(0, 1/hidden): unit gain, logits O(1)."""
    config = LlamaConfig(
        hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_attention_heads=sizes.num_attention_heads, num_key_value_heads=sizes.num_key_value_heads,
        num_hidden_layers=sizes.num_hidden_layers, vocab_size=sizes.vocab_size,
        max_position_embeddings=max(128, sizes.seq_length), rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=sizes.hidden_size**-0.5,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).float().save_pretrained(root / "hf")
    convert_hf_to_megatron(root / "hf", root / "megatron_tp1", 1, progress=False)
    return root / "hf", root / "megatron_tp1", json.loads((root / "hf" / "config.json").read_text())


def train_config(sizes: Sizes, dtype: str, hf_dir: Path, log_dir: Path, dump_steps: tuple[int, ...]):
    """The run's TrainConfig, checked as a YAML config is (data come from memory: data.train is not read)."""
    cfg = TrainConfig(
        model=ModelSection(base=str(hf_dir), dtype=dtype),
        parallel=ParallelSection(tp=1, micro_batch_size=sizes.micro_batch_size,
                                 global_batch_size=sizes.global_batch_size),
        lora=LoRASection(**LORA),
        optimizer=OptimizerSection(lr=LR, grad_clip=1.0),
        schedule=ScheduleSection(train_steps=sizes.steps, warmup_steps=0),
        deepspeed=DeepSpeedSection(zero_stage=ZERO_STAGE),
        data=DataSection(train="(in memory)", valid=None, seq_length=sizes.seq_length),
        checkpoint=CheckpointSection(every=0),
        logging=LoggingSection(dir=str(log_dir), progress=False, dump_steps=list(dump_steps)),
        seed=SEED,
    )
    check_config(cfg)
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_training(sizes: Sizes, dtype: str, hf_dir: Path, megatron_dir: Path, hf_config: dict, examples: Examples,
                 log_dir: Path, dump_steps: tuple[int, ...] = ()) -> dict[str, Any]:
    """`sizes.steps` optimizer steps of the trainer (a fresh Trainer: model, DeepSpeed engine, sampler), each timed;
    its step records, step times and peak device memory. dump_steps: written under log_dir/dump (see LoggingSection)."""
    cfg = train_config(sizes, dtype, hf_dir, log_dir, dump_steps)
    layout = batch_layout(cfg, world_size=1)
    run = PreparedRun(cfg, hf_dir, megatron_dir, hf_config, tokenizer=None, train_data=examples, valid_data=None,
                      tp=1, dp=1, grad_accum=layout.grad_accum)
    t0 = time.perf_counter()
    trainer = Trainer(run)
    device = trainer.info.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup_s = time.perf_counter() - t0
    records, step_s = [], []
    try:
        for _ in range(sizes.steps):
            _sync(device)
            t0 = time.perf_counter()
            records.append(trainer.train_step())
            _sync(device)
            step_s.append(time.perf_counter() - t0)
    finally:
        if hasattr(trainer.engine, "destroy"):
            trainer.engine.destroy()  # DeepSpeed's hooks and buffers; the next run builds its own engine
        trainer = None
        gc.collect()
    skip = max(1, *dump_steps) if dump_steps else 1  # the first step warms up; dumped steps also write files
    timed = step_s[skip:] or step_s
    median = statistics.median(timed)
    return dict(
        device=str(device), setup_s=round(setup_s, 2), losses=[r["loss"] for r in records],
        grad_norms=[r["grad_norm"] for r in records], records=records, step_s=[round(t, 4) for t in step_s],
        median_step_s=round(median, 4), timed_steps=_span(skip + 1, len(step_s)) if step_s[skip:] else "all",
        tokens_per_s=round(records[0]["tokens_processed"] / median, 1),
        peak_memory_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    )


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _flat(factors: dict) -> torch.Tensor:
    return torch.cat([t.detach().cpu().double().flatten() for key in sorted(factors) for t in factors[key]])


def _rel(got: dict, want: dict) -> float:
    if got.keys() != want.keys():
        raise ValueError(f"factor sets differ: {sorted(set(got) ^ set(want))[:4]}")
    g, w = _flat(got), _flat(want)
    return ((g - w).norm() / w.norm()).item()


def check_gradients(log_dir: Path, hf_dir: Path, examples: Examples, sizes: Sizes, records: list[dict],
                    device: torch.device) -> list[dict[str, Any]]:
    """Per dumped step: the trainer's accumulated gradients, loss and gradient norm against transformers + PEFT's
    float64 gradient of that step's global batch (the trainer's own sampler), from the run's dumped weights."""
    sampler = GlobalBatchSampler(len(examples), sizes.global_batch_size, sizes.global_batch_size, 0, 1, SEED)
    rows = []
    for step in DUMP_STEPS:
        dump = log_dir / "dump" / f"step_{step:06d}"
        weights, grads = load_native(dump / "weights"), load_native(dump / "grads").factors
        batch = collate(examples, sampler.global_batch(step - 1))
        hf = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").to(device, torch.float64)
        want, want_loss = mean_token_loss_gradients(hf, weights.settings, weights.factors, batch)
        hf = None
        record, want_norm = records[step - 1], _flat(want).norm().item()
        rows.append(dict(
            step=step,
            loss_tokens_per_example=batch["loss_mask"].sum(1).int().tolist(),
            grad_rel_err=_rel(grads, want),
            loss=record["loss"], reference_loss=want_loss,
            loss_rel_err=abs(record["loss"] - want_loss) / abs(want_loss),
            grad_norm=record["grad_norm"], reference_grad_norm=want_norm,
            grad_norm_rel_err=abs(record["grad_norm"] - want_norm) / want_norm,
        ))
    return rows


def bf16_supported() -> tuple[bool, str]:
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return False, f"{torch.cuda.get_device_name()} has no bfloat16"
    return True, ""


def gpu_check_part(smoke: bool, budget_s: float) -> PartResult:
    """Train in float32 (checked against float64 PEFT) and in bfloat16 on this machine's device, within budget_s.

    status: mismatch when a float32 gradient, loss or gradient norm differs from the reference by more than
    GRAD_RTOL, or a bf16 loss is not finite or its step-1 loss is off float32's by more than BF16_LOSS_RTOL; error
    when the reference or the bf16 run raised (what ran before is kept); ok otherwise; skipped without a GPU unless
    smoke. The bf16 run is left out (with why) when its turn comes with less of the budget left than the float32 run
    took.
    """
    start = time.perf_counter()
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        return PartResult(NAME, "skipped", "no CUDA device (smoke=True runs the part on CPU at tiny sizes)")
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    examples = make_examples(sizes)
    data: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if gpu else "cpu", tp=1, zero_stage=ZERO_STAGE, optimizer="torch AdamW",
        tf32=False, sizes=dataclasses.asdict(sizes), tokens_per_step=sizes.tokens_per_step,
        grad_accum=sizes.global_batch_size // sizes.micro_batch_size, lora=dict(LORA, targets="all 7"), lr=LR,
        grad_rtol=GRAD_RTOL, bf16_loss_rtol=BF16_LOSS_RTOL,
    )
    failures, errors, notes = [], [], []

    def attempt(what: str, fn):
        """fn() or None: a crash of the reference or of the bf16 run is reported, the numbers before it kept."""
        try:
            return fn()
        except Exception as exc:
            errors.append(f"{what} raised {type(exc).__name__}: {exc}")
            data.setdefault("tracebacks", {})[what] = traceback.format_exc()
            return None

    with exact_float32(), single_process_group() as info, tempfile.TemporaryDirectory(prefix="gpu_training_") as tmp:
        root = Path(tmp)
        hf_dir, megatron_dir, hf_config = write_base(root, sizes)
        fp32 = run_training(sizes, "float32", hf_dir, megatron_dir, hf_config, examples, root / "float32", DUMP_STEPS)
        fp32_s = time.perf_counter() - start
        records = fp32.pop("records")
        data["float32"] = fp32
        rows = attempt("the float64 reference",
                       lambda: check_gradients(root / "float32", hf_dir, examples, sizes, records, info.device))
        if rows is not None:
            data["gradient_checks"], data["max_rel_grad_err"] = rows, max(r["grad_rel_err"] for r in rows)
            for r in rows:
                for key, what in (("grad_rel_err", "gradients"), ("loss_rel_err", "loss"),
                                  ("grad_norm_rel_err", "gradient norm")):
                    if not r[key] <= GRAD_RTOL:  # NaN fails too
                        failures.append(f"float32 step {r['step']}: {what} vs float64 PEFT: {r[key]:.2e} relative "
                                        f"> {GRAD_RTOL:.0e}")
        ok, why = bf16_supported()
        left = budget_s - (time.perf_counter() - start)
        if ok and left < fp32_s:
            ok, why = False, f"{left:.0f} s left of the budget, the float32 run took {fp32_s:.0f} s"
        bf16 = None
        if ok:
            bf16 = attempt("the bfloat16 run", lambda: run_training(sizes, "bfloat16", hf_dir, megatron_dir, hf_config,
                                                                    examples, root / "bfloat16"))
        else:
            data["bfloat16"] = dict(skipped=why)
            notes.append(f"bfloat16 skipped: {why}")
        if bf16 is not None:
            bf16.pop("records")
            bf16["step1_rel_diff_vs_float32"] = abs(bf16["losses"][0] - fp32["losses"][0]) / abs(fp32["losses"][0])
            bf16["finite"] = all(math.isfinite(x) for x in bf16["losses"])
            data["bfloat16"] = bf16
            if not bf16["finite"]:
                failures.append(f"bfloat16 losses not finite: {bf16['losses']}")
            elif not bf16["step1_rel_diff_vs_float32"] <= BF16_LOSS_RTOL:
                failures.append(f"bfloat16 step-1 loss {bf16['losses'][0]:.6f} vs float32 {fp32['losses'][0]:.6f}: "
                                f"{bf16['step1_rel_diff_vs_float32']:.2e} relative > {BF16_LOSS_RTOL:.2e}")
    status = "error" if errors else "mismatch" if failures else "ok"
    return PartResult(NAME, status, "; ".join(errors + failures + notes), data=data, markdown=markdown(data))


def markdown(data: dict[str, Any]) -> str:
    """The part's tables: one row per dtype, one per checked gradient step."""
    s = data["sizes"]
    lines = [
        f"Training on {data['device']}: the trainer's steps at TP=1, DeepSpeed ZeRO-{data['zero_stage']} + torch "
        f"AdamW, random Llama {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, vocab {s['vocab_size']}; "
        f"BD-LoRA rank {data['lora']['rank']}, {data['lora']['nblocks']} blocks, all 7 projections; "
        f"{s['global_batch_size']}x{s['seq_length']} tokens a step in {data['grad_accum']} micro-batches; TF32 off",
        "",
        "| dtype | loss step 1 | loss last | step ms (median) | tokens/s | peak MiB | losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in ("float32", "bfloat16"):
        r = data.get(dtype)
        if r is None:
            continue
        if "skipped" in r:
            lines.append(f"| {dtype} | skipped: {r['skipped']} | | | | | |")
            continue
        peak = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(f"| {dtype} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {1e3 * r['median_step_s']:.1f} "
                     f"(steps {r['timed_steps']}) | {r['tokens_per_s']:.0f} | {peak} | {losses} |")
    if data.get("gradient_checks"):
        lines += ["", "float32 vs transformers + PEFT in float64, relative errors "
                  f"(tolerance {data['grad_rtol']:.0e}):", "", "| step | gradients | loss | gradient norm |",
                  "|---|---|---|---|"]
        for r in data["gradient_checks"]:
            lines.append(f"| {r['step']} | {r['grad_rel_err']:.2e} | {r['loss_rel_err']:.2e} "
                         f"| {r['grad_norm_rel_err']:.2e} |")
    bf16 = data.get("bfloat16") or {}
    if "step1_rel_diff_vs_float32" in bf16:
        lines += ["", f"bfloat16 step-1 loss vs float32: {bf16['step1_rel_diff_vs_float32']:.2e} relative "
                      f"(tolerance {data['bf16_loss_rtol']:.2e}, 4 bf16 unit roundoffs)"]
    return "\n".join(lines)
