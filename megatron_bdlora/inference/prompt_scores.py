"""Prompt log-probabilities (vLLM's prompt_logprobs, OpenAI's echo) computed during prefill, from the same forward.

megatron's dynamic context materialises only each request's last-token logits: GPTModel hands the hidden states to
`context.last_token_logits` before the output layer, so the vocabulary projection runs on one row per request.
`PromptScoringContext` also keeps, after those rows, the rows of every prompt token of the requests that asked (and
only theirs): a step without such a request costs what it cost before, and one with them pays the output layer and
one log_softmax on their prompt tokens only. Token t > 0 of a prompt gets log_softmax(logits at t - 1)[token t] and
the top-k of that row. Chunked prefill scores each chunk's positions in its own step; the scores accumulate per
request, indexed by position (a re-run of a position writes the same value), until every position is scored.
A request evicted after its prefill is re-prefilled without being scored again: it is complete by then.

Scores are raw log-probabilities, as the sampled tokens' (`sampling`): after the adapter, before any penalty or
temperature, over the real vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext

from megatron_bdlora.inference.requests import TokenLogprob

PromptLogprobs = tuple[TokenLogprob | None, ...]


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """Per row of logits [n, vocab]: the chosen token's raw log-probability and the row's top ks[i] alternatives,
    most likely first (one log_softmax and one top-k for all rows)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    values = logprobs.gather(1, chosen.view(-1, 1)).squeeze(1).tolist()  # [n]
    top_values, top_ids = logprobs.topk(max(ks), dim=-1) if max(ks) > 0 else (logprobs[:, :0], logprobs[:, :0])
    top_values, top_ids = top_values.tolist(), top_ids.long().tolist()
    return [
        TokenLogprob(int(token), value, tuple(zip(ids[:k], lps[:k])))
        for token, value, ids, lps, k in zip(chosen.tolist(), values, top_ids, top_values, ks)
    ]


class PromptScoringContext(DynamicInferenceContext):
    """megatron's dynamic context whose last-token selection also keeps the rows `extra_logit_rows` (token indices
    of this step), after the last-token rows: the logits of the prompt positions being scored."""

    extra_logit_rows: torch.Tensor | None = None  # set before each forward by PromptScores.plan_step

    def last_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        last = super().last_token_logits(logits)  # [active requests, hidden or vocab]
        if self.extra_logit_rows is None:
            return last
        return torch.cat([last, logits.squeeze(0)[self.extra_logit_rows]])  # [active + kept rows, ...]


@dataclass
class _Scoring:
    """One request's prompt scores so far, by position of the predicted token (1 .. len(prompt) - 1)."""

    prompt: torch.Tensor  # [L] int64
    k: int
    filled: torch.Tensor = field(init=False)  # [L] bool (position 0 is never scored)
    scores: list[TokenLogprob | None] = field(init=False)

    def __post_init__(self) -> None:
        self.filled = torch.zeros(len(self.prompt), dtype=torch.bool)
        self.filled[0] = True
        self.scores = [None] * len(self.prompt)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


@dataclass(frozen=True)
class _StepRequest:
    """A scored request's tokens in this step: its last-token row, its kept rows, the position of its first token."""

    request_id: int
    last_row: int  # index among the step's active requests
    kept_from: int  # index of its first kept row, after the last-token rows
    tokens: int  # its query tokens this step (kept rows: tokens - 1, then the last-token row)
    first_position: int


class PromptScores:
    """The prompt scores of the requests that asked, from plan (before a forward) to record (after it)."""

    def __init__(self) -> None:
        self.pending: dict[int, _Scoring] = {}
        self.complete: dict[int, PromptLogprobs] = {}  # until taken with the request's first event
        self._step: list[_StepRequest] = []

    def add(self, request_id: int, prompt_ids: tuple[int, ...], k: int) -> None:
        scoring = _Scoring(torch.tensor(prompt_ids, dtype=torch.long), k)
        if scoring.complete:  # a one-token prompt: nothing to score
            self.complete[request_id] = tuple(scoring.scores)
        else:
            self.pending[request_id] = scoring

    def remove(self, request_id: int) -> None:
        self.pending.pop(request_id, None)
        self.complete.pop(request_id, None)

    def take(self, request_id: int) -> PromptLogprobs | None:
        """The request's prompt log-probabilities once complete (then forgotten), else None."""
        return self.complete.pop(request_id, None)

    def plan_step(self, context: PromptScoringContext) -> None:
        """Before a forward: which token rows of the step to keep, for the pending requests in it."""
        self._step, context.extra_logit_rows = [], None
        if not self.pending:
            return
        active = slice(context.paused_request_count, context.total_request_count)
        request_ids = context.request_ids[active].tolist()
        if not any(rid in self.pending for rid in request_ids):
            return
        lengths = context.request_query_lengths[active].tolist()
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        scored = [j for j, rid in enumerate(request_ids) if rid in self.pending]
        first_tokens = torch.tensor([starts[j] for j in scored], device=context.token_to_pos_ids.device)
        first_positions = context.token_to_pos_ids[first_tokens].tolist()
        kept, rows = 0, []
        for j, position in zip(scored, first_positions):
            self._step.append(_StepRequest(request_ids[j], j, kept, lengths[j], position))
            rows += range(starts[j], starts[j] + lengths[j] - 1)  # the last one is already a last-token row
            kept += lengths[j] - 1
        if rows:
            context.extra_logit_rows = torch.tensor(rows, device=context.request_ids.device)

    def record(self, logits: torch.Tensor, active: int) -> None:
        """After the forward: logits [active + kept rows, vocab] (last-token rows first) -> the step's scores."""
        rows, targets, ks, where = [], [], [], []
        for s in self._step:
            scoring = self.pending[s.request_id]
            step_rows = [active + s.kept_from + i for i in range(s.tokens - 1)] + [s.last_row]
            for i, row in enumerate(step_rows):
                target = s.first_position + i + 1  # the prompt position this row predicts
                if target < len(scoring.prompt):
                    rows.append(row)
                    targets.append(int(scoring.prompt[target]))
                    ks.append(scoring.k)
                    where.append((scoring, target))
        self._step = []
        if not rows:
            return
        index = torch.tensor(rows, device=logits.device)
        entries = top_logprobs(logits[index], torch.tensor(targets, device=logits.device), ks)
        for (scoring, target), entry in zip(where, entries):
            scoring.scores[target] = entry
            scoring.filled[target] = True
        for rid in [rid for rid, scoring in self.pending.items() if scoring.complete]:
            self.complete[rid] = tuple(self.pending.pop(rid).scores)
