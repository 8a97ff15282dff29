"""What the serving benchmarks and checks share: a base model, adapters and a tokenizer made in memory, the
transformers + PEFT mixed-adapter batching peer, and small statistics over steps and outputs.

Everything here works without files from a model hub and on any device, so that a GPU machine with no network
and no tokenizer files (the prepared GPU check) runs the same code as the CPU benchmarks (tools/bench_serving.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_bdlora.checkpoint.adapters import AdapterCheckpoint, save_native
from megatron_bdlora.checkpoint.hf import layouts
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import free_port
from megatron_bdlora.parallel import destroy_parallel, init_parallel
from megatron_bdlora.targets import lora_plan

B_STD = 0.01  # std of the random B factors (A is scaled to unit gain): an adapter that visibly changes outputs
PEFT_BASE = "__base__"  # PEFT's adapter name for rows of a mixed batch that use no adapter

Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, projection) -> full stored (A, B)


# ---------------------------------------------------------------------------------------------------- process group


@contextlib.contextmanager
def single_process_group() -> Iterator[Any]:
    """megatron's TP=1 groups in this process, for serving in-process (ServingLoop at TP 1).

    MASTER_ADDR / MASTER_PORT (a free port) / RANK / WORLD_SIZE / LOCAL_RANK are set only where absent and removed
    again afterwards; groups that this call created are destroyed at exit (a caller's own groups are kept).
    Yields megatron_bdlora.parallel.ParallelInfo (device: cuda:LOCAL_RANK with a GPU, else cpu).
    """
    own = not dist.is_initialized()
    defaults = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        info = init_parallel(tp_size=1)
        if info.world_size != 1:
            raise RuntimeError(f"single_process_group needs a world of 1 process, found {info.world_size}")
        yield info
    finally:
        if own:
            destroy_parallel()
        for k in added:
            os.environ.pop(k, None)


# ---------------------------------------------------------------------------------------------------- base model


def word_tokenizer(vocab_size: int) -> Any:
    """A real Hugging Face fast tokenizer built in memory: "t5 t6" <-> [5, 6], EOS "</s>" = vocab_size - 1.

    The serving loop needs a tokenizer (EOS, decode for stop strings and text events); prompts are token ids, so
    any tokenizer covering the vocabulary will do, and this one needs no files.
    """
    # lazy (transformers and peft, here and below): seconds to import, and tools/bench_serving.py imports this module
    # before it parses its flags
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@torch.no_grad()
def random_base_state(hf_config: dict, device: torch.device | str, dtype: torch.dtype,
                      seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of a Llama under megatron's TP=1 keys, drawn on `device` (fast at 8B widths on a GPU).

    Projections have unit gain (N(0, 1) / sqrt(fan in)), embeddings N(0, 1), norms 1: activations and logits stay
    O(1) through any depth, so greedy tokens are not decided by near-ties and adapters visibly change them.
    """
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for lay in layouts(hf_config, 1):
        shape = lay.shard_shape(1)
        if len(shape) == 1:  # RMSNorm weight [h]
            state[lay.megatron] = torch.ones(shape, dtype=dtype, device=device)
            continue
        t = torch.randn(shape, generator=gen, device=device)  # [out, in]
        if "embedding" not in lay.megatron:
            t /= shape[1] ** 0.5
        state[lay.megatron] = t.to(dtype)
    return state


def hf_state_from_megatron(state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """The same weights under transformers' LlamaForCausalLM keys (the converter's layouts, in memory)."""
    return {name: t for lay in layouts(hf_config, 1) for name, t in zip(lay.hf, lay.merge([state[lay.megatron]]))}


def hf_llama(hf_config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with exactly the weights of a megatron TP=1 state, on the state's device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = next(iter(state.values())).device
    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}  # the class's own
    with torch.device(device):  # its own random init runs where the weights go (seconds on a CPU at 8B widths)
        model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype)
    model.load_state_dict(hf_state_from_megatron(state, hf_config), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- adapters


def random_adapter_factors(hf_config: dict, settings: LoRASettings, tp: int, seed: int,
                           b_std: float = B_STD) -> Factors:
    """Random non-zero factors for every layer and target in the stored (PEFT) shapes: A unit gain, B std b_std."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(hf_config["num_hidden_layers"]):
        for proj in settings.targets:
            plan = lora_plan(hf_config, proj, settings, tp)  # stored (PEFT) shapes
            a = torch.randn(plan.a.full_shape, generator=g) / plan.a.full_shape[1] ** 0.5  # [r, in / blocks?]
            b = torch.randn(plan.b.full_shape, generator=g) * b_std  # [out, r / blocks?]
            factors[(layer, proj)] = (a, b)
    return factors


def save_adapter(path: Path, hf_config: dict, settings: LoRASettings, tp: int, factors: Factors) -> str:
    """A native adapter checkpoint of these factors (what the serving loop loads); its directory."""
    ckpt = AdapterCheckpoint(settings, hf_config, tp, factors, base_model_name="bench")
    return str(save_native(ckpt, path, overwrite=True))


def write_random_adapter(path: Path, hf_config: dict, settings: LoRASettings, tp: int, seed: int,
                         b_std: float = B_STD) -> str:
    """One native checkpoint of random factors for every layer and target at `settings`' rank and blocks."""
    return save_adapter(path, hf_config, settings, tp, random_adapter_factors(hf_config, settings, tp, seed, b_std))


# ---------------------------------------------------------------------------------------------------- PEFT peer


class StepTimes:
    """A StoppingCriteria that only timestamps each generated token position (never stops).

    On a GPU it first waits for the device, so that the gaps between timestamps are steps done, not steps queued.
    """

    def __init__(self, t0: float) -> None:
        self.t0, self.times = t0, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter() - self.t0)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class PeftBatcher:
    """transformers + PEFT with the K adapters loaded, serving static batches with `adapter_names` per row.

    base: an HF model directory (loaded in float32 on the CPU) or a model already in memory (its device and dtype
    are kept). autocast_adapter_dtype: PEFT's own flag (its default True keeps bf16/fp16 adapters in float32;
    False computes them in the base model's dtype, as our serving loop does).
    """

    def __init__(self, base: Path | str | torch.nn.Module, peft_dirs: dict[str, str], batch_size: int,
                 autocast_adapter_dtype: bool = True) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, GenerationConfig

        if isinstance(base, (str, os.PathLike)):
            base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        names = list(peft_dirs)
        model = PeftModel.from_pretrained(base, peft_dirs[names[0]], adapter_name=names[0],
                                          autocast_adapter_dtype=autocast_adapter_dtype)
        for name in names[1:]:
            model.load_adapter(peft_dirs[name], adapter_name=name, autocast_adapter_dtype=autocast_adapter_dtype)
        self.model = model.eval()
        self.device = next(base.parameters()).device
        self.batch_size = batch_size
        self.pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        # greedy, every request runs its full length (EOS does not stop it, as ignore_eos in our loop)
        self.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=self.pad_id)
        self.engine_steps = 0

    @torch.inference_mode()
    def _generate(self, batch: list[dict], adapters: list[str], timer: StepTimes) -> list[list[int]]:
        """One left-padded batch: new tokens of each row, cut to its own output length."""
        width = max(len(r["prompt_ids"]) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [b, width]
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r["prompt_ids"]):] = torch.tensor(r["prompt_ids"])
            mask[row, width - len(r["prompt_ids"]):] = 1
        steps = max(r["output_len"] for r in batch)
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = steps
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), adapter_names=adapters,
            generation_config=config, stopping_criteria=[timer],
        )  # [b, width + steps]
        self.engine_steps += steps
        return [out[row, width: width + r["output_len"]].tolist() for row, r in enumerate(batch)]

    def replay(self, workload: list[dict], adapters: list[str], bar: Any = None) -> dict:
        """Batches of batch_size requests in arrival order; a batch starts when its last request has arrived."""
        steps0 = self.engine_steps
        recs = [dict(arrival=r["arrival_s"], first=None, finish=None, tokens=[]) for r in workload]
        decode_step_s: list[float] = []  # one decode step of generate = the gap between consecutive tokens
        t0 = time.perf_counter()
        for lo in range(0, len(workload), self.batch_size):
            batch = workload[lo: lo + self.batch_size]
            time.sleep(max(0.0, batch[-1]["arrival_s"] - (time.perf_counter() - t0)))
            timer = StepTimes(t0)
            tokens = self._generate(batch, adapters[lo: lo + len(batch)], timer)
            decode_step_s += [b - a for a, b in zip(timer.times, timer.times[1:])]
            for j, (r, toks) in enumerate(zip(batch, tokens)):
                rec = recs[lo + j]
                rec["tokens"], rec["first"], rec["finish"] = toks, timer.times[0], timer.times[r["output_len"] - 1]
            if bar is not None:
                bar.update(len(batch))
        return dict(requests=recs, engine_steps=self.engine_steps - steps0, decode_steps=len(decode_step_s),
                    decode_collectives=None, decode_step_s=decode_step_s)


# ---------------------------------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def compare_tokens(ours: list[list[int]], other: list[list[int]]) -> dict:
    """Greedy-output agreement: requests that differ, and where each first diverges (None: identical)."""
    firsts = []
    for a, b in zip(ours, other):
        pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if pos is None and len(a) != len(b):
            pos = min(len(a), len(b))
        firsts.append(pos)
    total = sum(len(a) for a in ours)
    prefix = sum(len(a) if p is None else p for a, p in zip(ours, firsts))
    return dict(
        requests=len(ours),
        mismatches=sum(p is not None for p in firsts),
        exact_match_requests=sum(p is None for p in firsts),
        first_divergence=firsts,
        tokens_before_first_divergence=prefix / total if total else 1.0,
    )
