"""Greedy generation on the TP-sharded megatron model, for checking a base model or one adapter end to end.

torchrun --nproc_per_node N -m megatron_bdlora.generate --megatron-dir MEG [--adapter DIR] \
    --prompt TEXT [--prompt TEXT ...] [--chat] --max-new-tokens K --greedy --json

TP is the world size. Each step recomputes the whole (left-padded) batch without a KV cache: slow but exact,
which is what a checking tool needs; the serving engine has the cached path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer

from megatron_bdlora.checkpoint.hf import load_megatron_rank_state
from megatron_bdlora.checkpoint.reader import read_adapter
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.model import build_model, forward_logits, load_adapter_state_dict, load_base_state_dict
from megatron_bdlora.parallel import destroy_parallel, init_parallel


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int = 0
) -> list[list[int]]:
    """New token ids per prompt (up to and including the first EOS), decoding the batch together."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])  # [b, s] left-padded
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        next_ids = forward_logits(model, ids, mask)[:, -1].argmax(dim=-1)  # [b]
        for i, tok in enumerate(next_ids.tolist()):
            if not done[i]:
                new[i].append(tok)
                done[i] = tok in eos_ids
        if all(done):
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return new


def load_adapter_for_model(
    adapter_dir: str | Path, hf_config: dict, tp: int, tp_rank: int, plain_lora_mode: str = "replicated"
) -> tuple[LoRASettings, Callable[[torch.nn.Module], None]]:
    """(settings to build the model with, loader of this rank's slices) for an adapter directory, in its own mode."""
    adapter = read_adapter(adapter_dir, hf_config, tp, plain_lora_mode=plain_lora_mode)
    state = adapter.rank_state(tp_rank)
    return adapter.settings, lambda model: load_adapter_state_dict(model, state)


def load_model_for_generation(
    megatron_dir: Path, tp: int, tp_rank: int, adapter_dir: Path | None, dtype: str, plain_lora_mode: str = "replicated"
) -> torch.nn.Module:
    """Base model from a megatron checkpoint, with an adapter (native or PEFT directory) when given."""
    hf_config = json.loads((megatron_dir / "config.json").read_text())
    settings, load = None, None
    if adapter_dir is not None:
        settings, load = load_adapter_for_model(adapter_dir, hf_config, tp, tp_rank, plain_lora_mode)
    model = build_model(hf_config, tp, settings, dtype)
    if torch.cuda.is_available():  # built on the host (megatron's CPU init); init_parallel set this rank's device
        model.cuda(torch.cuda.current_device())
    load_base_state_dict(model, load_megatron_rank_state(megatron_dir, tp_rank, tp))
    if load is not None:
        load(model)
    return model.eval()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", type=Path, required=True,
                   help="megatron base checkpoint (tools/convert_hf_to_megatron.py)")
    p.add_argument("--adapter", type=Path, help="native adapter directory or PEFT adapter directory")
    p.add_argument("--adapter-mode", default="replicated", choices=["replicated", "slora"],
                   help="sharding of a plain (non-BD) PEFT LoRA adapter; BD adapters always run block-diagonal")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (stops early at EOS)")
    p.add_argument("--greedy", action="store_true", default=True,
                   help="greedy decoding (the only mode; kept for clarity)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (prompt, token_ids, text)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not (args.megatron_dir / "config.json").is_file():  # before any process group or weights: a typo fails fast
        print(f"error: {args.megatron_dir} is not a megatron checkpoint (no config.json)", file=sys.stderr)
        return 2
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        info = init_parallel(tp_size=tp)
        tok = AutoTokenizer.from_pretrained(args.megatron_dir)
        model = load_model_for_generation(
            args.megatron_dir, tp, info.tp_rank, args.adapter, args.dtype, args.adapter_mode
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.chat:
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for p in args.prompt
        ]
    else:
        prompts = [tok(p)["input_ids"] for p in args.prompt]
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    outputs = greedy_generate(model, [list(p) for p in prompts], args.max_new_tokens, eos, tok.pad_token_id or 0)
    if info.rank == 0:
        for prompt, ids in zip(args.prompt, outputs):
            text = tok.decode(ids, skip_special_tokens=True)
            print(json.dumps({"prompt": prompt, "token_ids": ids, "text": text}) if args.json else text, flush=True)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
