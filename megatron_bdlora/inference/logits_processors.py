"""Logit controls that change which token wins, OpenAI / vLLM semantics, applied before greedy or sampling:
logit_bias, min_tokens, then the repetition, frequency and presence penalties (vLLM's V1 order).

- logit_bias: added to the logits of its token ids (OpenAI).
- min_tokens: EOS and the stop token ids get -inf until that many tokens are generated (vLLM masks EOS even with
  ignore_eos: it is one of a request's stop ids for this purpose).
- repetition_penalty (transformers / vLLM): over prompt + generated tokens, positive logits divided by it, negative
  ones multiplied.
- frequency / presence penalties (OpenAI): logit - count * frequency_penalty - (count > 0) * presence_penalty, over
  generated tokens only.

Each request keeps its own counts (per-request state); one step applies every request's controls to a stacked
[requests, vocab] tensor in a few vectorised operations, never a loop over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_bdlora.inference.requests import GenerationParams


@dataclass
class LogitControls:
    """One request's controls and the state they need: the prompt's token ids, the generated tokens' counts."""

    params: GenerationParams
    prompt_ids: tuple[int, ...]
    min_token_stops: tuple[int, ...]  # masked while fewer than min_tokens were generated
    generated: int = 0
    counts: torch.Tensor | None = None  # [vocab] float32 on the logits' device, made at the first step
    seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or generated (repetition_penalty)

    @classmethod
    def of(cls, params: GenerationParams, prompt_ids: tuple[int, ...], eos_id: int) -> "LogitControls | None":
        """The request's controls, or None if it has none (it then costs nothing per step)."""
        if not (_penalised(params) or params.logit_bias or params.min_tokens > 0):
            return None
        stops = tuple(dict.fromkeys(([eos_id] if eos_id >= 0 else []) + list(params.stop_token_ids)))
        return cls(params, tuple(prompt_ids), stops)

    def count(self, token: int) -> None:
        """Record one generated token."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True

    def state(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, seen), made on the first step on the logits' device."""
        if self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            if self.params.repetition_penalty != 1.0 and self.prompt_ids:
                self.seen[torch.tensor(self.prompt_ids, device=device)] = True
        return self.counts, self.seen


def apply_controls(logits: torch.Tensor, controlled: list[tuple[int, LogitControls]]) -> torch.Tensor:
    """A copy of logits [requests, vocab] whose rows `controlled` (row, controls) have their controls applied."""
    out = logits.clone()
    rows, cols, values = [], [], []  # logit_bias, then min_tokens' -inf, written in one index_put each
    masked_rows, masked_cols = [], []
    for row, c in controlled:
        for token, bias in c.params.logit_bias:
            rows.append(row)
            cols.append(token)
            values.append(bias)
        if c.generated < c.params.min_tokens:
            masked_rows += [row] * len(c.min_token_stops)
            masked_cols += c.min_token_stops
    if rows:
        index = (torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device))
        out.index_put_(index, torch.tensor(values, dtype=out.dtype, device=out.device), accumulate=True)
    if masked_rows:
        out[torch.tensor(masked_rows, device=out.device), torch.tensor(masked_cols, device=out.device)] = float("-inf")
    penalised = [(row, c) for row, c in controlled if _penalised(c.params)]
    if penalised:
        index = torch.tensor([row for row, _ in penalised], device=out.device)
        out[index] = _penalties(out[index], [c for _, c in penalised])
    return out


def _penalties(logits: torch.Tensor, controls: list[LogitControls]) -> torch.Tensor:
    """Repetition, then frequency and presence penalties on [n, vocab] logits, one row per request."""
    vocab, device = logits.shape[-1], logits.device
    counts, seen = zip(*(c.state(vocab, device) for c in controls))
    counts, seen = torch.stack(counts), torch.stack(seen)  # [n, vocab]

    def column(name: str) -> torch.Tensor:  # [n, 1]
        return torch.tensor([getattr(c.params, name) for c in controls], device=device).unsqueeze(1)

    repetition = torch.where(seen, column("repetition_penalty"), 1.0)
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    return logits - counts * column("frequency_penalty") - (counts > 0) * column("presence_penalty")


def _penalised(p: GenerationParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
