"""The fine-tuning run: checks and data first (no process group yet), then TP x DP model, DeepSpeed, the loop.

One optimizer step = one global batch, split over data-parallel ranks and accumulation micro-batches.
The loss is the mean over every loss token of the global batch, whatever the DP / accumulation split,
so TP=1 x DP=2 and TP=1 x DP=1 with twice the accumulation take identical steps.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoTokenizer

from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base
from megatron_bdlora.checkpoint.adapters import check_same_settings, save_native_rank_states
from megatron_bdlora.checkpoint.hf import load_megatron_rank_state
from megatron_bdlora.checkpoint.reader import read_adapter
from megatron_bdlora.model import (
    adapter_state_dict,
    build_model,
    causal_mask,
    load_adapter_state_dict,
    load_base_state_dict,
)
from megatron_bdlora.parallel import init_parallel
from megatron_bdlora.targets import check_llama_config, lora_plan
from megatron_bdlora.training.checkpoint import (
    base_model_identity,
    check_resume_base,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron_bdlora.training.config import ConfigError, TrainConfig, check_run_files
from megatron_bdlora.training.data import GlobalBatchSampler, collate, load_examples
from megatron_bdlora.training.deepspeed_engine import build_engine
from megatron_bdlora.training.metrics import MetricsLog
from megatron_bdlora.training.step_state import full_grad, optimizer_state, stage0_grad_norm


@dataclass
class PreparedRun:
    """Everything checked and loaded before any process group exists."""

    cfg: TrainConfig
    hf_dir: Path
    megatron_dir: Path
    hf_config: dict
    tokenizer: Any
    train_data: Any
    valid_data: Any | None
    tp: int
    dp: int
    grad_accum: int  # micro-batches per DP rank per step
    init_adapter: Callable[[torch.nn.Module], None] | None = None  # loads lora.init's slices of this rank


def prepare_run(cfg: TrainConfig, world_size: int, rank: int = 0, resume: bool = False) -> PreparedRun:
    """Resolve the base model, validate shapes/plans, the checkpoint to resume (layout, LoRA settings, base model) and
    the adapter to start from, and load the data; raises ConfigError / FileNotFoundError / ValueError."""
    layout = check_run_files(cfg, world_size, resume)
    tp, dp = layout.tp, layout.dp
    hf_dir = resolve_hf_base(cfg.model.base, cfg.model.random_config, cfg.seed)
    if resume:
        try:
            check_resume_base(cfg.checkpoint_dir(), hf_dir, cfg.model.base)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    hf_config = json.loads((hf_dir / "config.json").read_text())
    settings = cfg.lora.settings(cfg.seed)
    try:
        check_llama_config(hf_config, tp)
        for proj in settings.targets:
            lora_plan(hf_config, proj, settings, tp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train = load_examples(cfg.data.train, cfg.data.format, tokenizer, cfg.data.seq_length)
    valid = load_examples(cfg.data.valid, cfg.data.format, tokenizer, cfg.data.seq_length) if cfg.data.valid else None
    init_adapter = _init_adapter(cfg.lora.init, settings, hf_config, tp, rank % tp) if cfg.lora.init else None
    megatron_dir = ensure_megatron_base(hf_dir, tp)
    return PreparedRun(
        cfg, hf_dir, megatron_dir, hf_config, tokenizer, train, valid, tp, dp, layout.grad_accum, init_adapter
    )


def _init_adapter(path: str, settings, hf_config: dict, tp: int, tp_rank: int) -> Callable[[torch.nn.Module], None]:
    """This rank's slices of the adapter to start from (megatron orders TP ranks fastest: tp_rank = rank % tp),
    after checking it was made for this base model and with the run's LoRA settings."""
    saved = read_adapter(path, hf_config, tp, plain_lora_mode=settings.mode)
    try:
        check_same_settings(saved.settings, settings, tp, f"lora.init={path}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    state = saved.rank_state(tp_rank)
    return lambda model: load_adapter_state_dict(model, state)


def _causal(ids: torch.Tensor) -> torch.Tensor:
    return causal_mask(torch.ones_like(ids, device="cpu")).to(ids.device)  # causal_mask builds on the host


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated micro-batch on the device the model computes on (ParallelInfo.device; a no-op on CPU)."""
    return {name: t.to(device) for name, t in batch.items()}


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy [b, s] from megatron's vocab-parallel loss (no logits gathered); the batch must be on
    the model's device."""
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    return model(ids, pos, _causal(ids), labels=batch["labels"]).float()


class Trainer:
    """Holds the model, engine, sampler and logs of one run; `run()` trains to schedule.train_steps."""

    def __init__(self, run: PreparedRun) -> None:
        cfg = self.cfg = run.cfg
        self.run_info = run
        self.info = init_parallel(run.tp, seed=cfg.seed)
        self.settings = cfg.lora.settings(cfg.seed)
        self.model = build_model(run.hf_config, run.tp, self.settings, cfg.model.dtype)
        load_base_state_dict(self.model, load_megatron_rank_state(run.megatron_dir, self.info.tp_rank, run.tp))
        if run.init_adapter is not None:
            run.init_adapter(self.model)
        # built and loaded on the host (megatron's CPU initialisation), computed on this rank's device
        self.model.to(self.info.device)
        self.dp_group = parallel_state.get_data_parallel_group()
        micro, dp = cfg.parallel.micro_batch_size, run.dp
        self.grad_accum = run.grad_accum
        self.sampler = GlobalBatchSampler(
            len(run.train_data), cfg.parallel.global_batch_size, micro, self.info.dp_rank, dp, cfg.seed
        )
        self.engine, self.scheduler = build_engine(self.model, cfg, self.grad_accum)
        self.log_dir = Path(cfg.logging.dir)
        self.ckpt_dir = cfg.checkpoint_dir()
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # -- data-parallel helpers -------------------------------------------------------------------------
    def _dp_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.info.device)  # nccl reduces device tensors only
        dist.all_reduce(t, group=self.dp_group)
        return t.item()

    # -- one optimizer step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        micro_batches = [collate(self.run_info.train_data, idx) for idx in self.sampler.micro_batches(self.step)]
        tokens = self._dp_sum(sum(float(b["loss_mask"].sum()) for b in micro_batches))
        if tokens == 0:
            raise RuntimeError(f"step {self.step}: the global batch has no loss tokens")
        # DeepSpeed divides by accumulation steps and averages over DP: undo both so the gradient is the
        # mean over every loss token of the global batch
        scale = self.grad_accum * self.run_info.dp / tokens
        lr = self.scheduler.get_last_lr()[0]
        dumped = self.step + 1 in self.cfg.logging.dump_steps
        dump = self.log_dir / "dump" / f"step_{self.step + 1:06d}" if dumped else None
        if dump:
            self.write_adapter(dump / "weights")
        loss_sum = 0.0
        self.engine.train()
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.info.device)
            per_token = token_losses(self.engine, batch)
            summed = (per_token * batch["loss_mask"]).sum()
            self.engine.backward(summed * scale)
            if i == len(micro_batches) - 1:  # the boundary: gradients accumulated and DP-reduced, not yet clipped
                grad_norm = self._grad_norm_before_step()
                if dump:
                    self.write_adapter(dump / "grads", adapter_state_dict(self.model, value=full_grad))
            self.engine.step()
            loss_sum += summed.item()
        if dump:
            exp_avg = adapter_state_dict(self.model, value=optimizer_state(self.engine, "exp_avg"))
            self.write_adapter(dump / "exp_avg", exp_avg)
        loss = self._dp_sum(loss_sum) / tokens
        self.step += 1
        grad_norm = grad_norm if grad_norm is not None else float(self.engine.get_global_grad_norm())
        processed = self._dp_sum(sum(float(b["input_ids"].numel()) for b in micro_batches))
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "clipped": 0 < self.cfg.optimizer.grad_clip < grad_norm,
                "tokens": tokens, "tokens_processed": processed}

    def _grad_norm_before_step(self) -> float | None:
        """The gradient norm clipping will see, where DeepSpeed does not report it after the step (no ZeRO, fp32)."""
        if self.engine.zero_optimization() or self.engine.bfloat16_enabled():
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        return stage0_grad_norm(params, parallel_state.get_tensor_model_parallel_group())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out mean token loss and perplexity over up to logging.eval_batches micro-batches per DP rank."""
        data = self.run_info.valid_data
        micro = self.cfg.parallel.micro_batch_size
        self.engine.eval()
        loss_sum = tokens = 0.0
        n = len(data)
        for j in range(self.cfg.logging.eval_batches):
            start = (j * self.run_info.dp + self.info.dp_rank) * micro
            if start >= n:
                break
            batch = to_device(collate(data, list(range(start, min(n, start + micro)))), self.info.device)
            loss_sum += float((token_losses(self.engine, batch) * batch["loss_mask"]).sum())
            tokens += float(batch["loss_mask"].sum())
        loss = self._dp_sum(loss_sum) / max(1.0, self._dp_sum(tokens))
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    # -- checkpoints -----------------------------------------------------------------------------------
    def write_adapter(self, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Collective: data-parallel replica 0 gathers its TP shards (the adapter, or `state` in its layout: gradients,
        optimizer moments) to global rank 0, which writes them as a native adapter directory."""
        if self.info.dp_rank == 0:
            tp_group = parallel_state.get_tensor_model_parallel_group()
            states = [None] * self.run_info.tp if self.info.tp_rank == 0 else None
            local = adapter_state_dict(self.model) if state is None else state
            local = {key: t.cpu() for key, t in local.items()}  # host copies: pickled to rank 0, written from there
            dist.gather_object(local, states, dst=dist.get_global_rank(tp_group, 0), group=tp_group)
            if self.info.rank == 0:
                save_native_rank_states(
                    out_dir, self.settings, self.run_info.hf_config, self.run_info.tp, states,
                    base_model_name=str(self.cfg.model.base), overwrite=True,
                )
        dist.barrier()

    @functools.cached_property
    def base_model(self) -> dict[str, str] | None:
        """The base model's identity, recorded in every checkpoint: hashed once, by rank 0, which writes it."""
        return base_model_identity(self.run_info.hf_dir) if self.info.rank == 0 else None

    def save(self) -> Path:
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "history": self.history}
        tp, dp = self.run_info.tp, self.run_info.dp
        meta = {"tp": tp, "dp": dp, "world_size": tp * dp, "base_model": self.base_model}
        return save_checkpoint(
            self.ckpt_dir, self.step, self.engine, state, self.write_adapter, self.cfg.checkpoint.keep, meta
        )

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any; returns whether one was found."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.engine)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.history = state["history"]
        return True

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        log = MetricsLog(self.log_dir, enabled=self.info.rank == 0, tensorboard=cfg.logging.tensorboard,
                         progress=cfg.logging.progress, total=cfg.schedule.train_steps, initial=self.step)
        every, eval_every = cfg.checkpoint.every, cfg.logging.eval_every
        while self.step < cfg.schedule.train_steps:
            t0 = time.perf_counter()
            record = self.train_step()
            # all input tokens, all DP ranks
            record["tokens_per_s"] = record["tokens_processed"] / (time.perf_counter() - t0)
            last = self.step == cfg.schedule.train_steps
            if self.run_info.valid_data is not None and ((eval_every and self.step % eval_every == 0) or last):
                record.update(self.evaluate())
            self.history.append(record)
            log.write(record, show=self.step % cfg.logging.every == 0 or last)
            if (every and self.step % every == 0) or last:
                self.save()
        self.write_adapter(self.log_dir / "adapter")
        log.close()
        return self.history
