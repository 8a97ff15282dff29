"""Offline generation of a fixed list of requests, each for an adapter or the base model, in one mixed batch.

What the server does for concurrent clients, without HTTP: rank 0 submits every request to the serving loop
before the first step, so they are admitted together and share every engine step (prefill and decode), each
token running through its own adapter slot; every TP rank steps in lockstep until all have finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_bdlora.inference.requests import GenerationParams
from megatron_bdlora.inference.serving_config import ServingConfig
from megatron_bdlora.inference.serving_loop import ServingLoop


@dataclass(frozen=True)
class Completion:
    """One request's result (rank 0)."""

    prompt_ids: list[int]
    adapter: str | None  # None = the base model
    token_ids: list[int]
    text: str
    finish_reason: str


def generate_mixed_batch(
    info: Any,
    config: ServingConfig,
    requests: list[tuple[list[int], str | None]],
    params: GenerationParams,
    progress: bool = True,
) -> tuple[list[Completion], int]:
    """Every rank: serve (prompt ids, adapter or None) requests together; rank 0 gets (completions in request
    order, the most requests that one engine step held), the other ranks ([], that count)."""
    loop = ServingLoop.create(config, info)
    lead = info.rank == 0
    queues = [loop.submit(list(prompt), adapter, params)[1] for prompt, adapter in requests] if lead else []
    tokens: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    finish: list[str | None] = [None] * len(requests)
    widest = 0
    with tqdm(total=len(requests) * params.max_tokens, desc="serving", unit="tok",
              disable=not (progress and lead)) as bar:
        while True:
            loop.step()
            widest = max(widest, loop.engine.context.total_request_count)
            for i, events in enumerate(queues):
                while not events.empty():
                    event = events.get()
                    tokens[i] += event.token_ids
                    texts[i] += event.text
                    bar.update(len(event.token_ids))
                    if event.finished:
                        finish[i] = event.finish_reason
                        if event.error:
                            raise RuntimeError(f"request {i} ({requests[i][1] or 'base'}) failed: {event.error}")
            done = torch.tensor([int(not lead or all(f is not None for f in finish))])
            if info.tp_size > 1:
                dist.all_reduce(done, op=dist.ReduceOp.MIN)  # rank 0 decides; the others keep stepping with it
            if done.item():
                break
    if not lead:
        return [], widest
    return [Completion(list(p), a, t, s, f) for (p, a), t, s, f in zip(requests, tokens, texts, finish)], widest
