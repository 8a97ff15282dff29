"""Multi-adapter LoRA: add the LoRA outputs of many adapters to one batch of tokens.

A LoRA branch is a *shrink* (x -> rank space, by A) and an *expand* (rank space -> out, by B), with the
sharding plan's collective (if any) between them; this module knows nothing about TP. Factors live in
stacks of adapter slots sized for the largest adapter ([slots, rows, cols]); each slot has its own view
(rows, cols, blocks) of its stack entry, so adapters of different ranks and block counts share one batch
and a small adapter does only its own work (its slice of the stack, never padded zeros).

Serving groups the batch's tokens by slot once per step (`SlotBatch`); every layer reuses that grouping:
tokens are gathered into slot order, each slot's segment multiplies its factor view, results are scattered
back. Training uses one slot and no grouping. The GPU kernels of the Triton issue plug in behind
`lora_shrink` / `lora_expand`, which keep these signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


SHORT_SEGMENT = 16  # tokens: segments up to this long are batched whatever their padding


@dataclass(frozen=True)
class FactorView:
    """The part of a slot's [rows, cols] stack entry an adapter uses, and its block count (packed BD)."""

    rows: int
    cols: int
    blocks: int = 1

    @property
    def in_width(self) -> int:
        """Input features the view consumes: cols per block times blocks."""
        return self.cols * self.blocks


@dataclass(frozen=True)
class SlotBatch:
    """Tokens grouped by adapter slot for one forward step (built once, reused by every LoRA layer).

    order: [n] positions (in the flattened token order) of the tokens that use an adapter, grouped by slot
    (stable), or None when every token uses an adapter and they are already grouped (no gather/scatter).
    segments: (slot, start, stop) ranges over the grouped rows.
    """

    num_tokens: int
    order: torch.Tensor | None
    segments: tuple[tuple[int, int, int], ...]
    _padded: dict = field(default_factory=dict, compare=False, repr=False)  # per-step cache of padded()

    @staticmethod
    def from_slot_ids(slot_ids: torch.Tensor) -> "SlotBatch":
        """Group tokens by slot id ([tokens], -1 = no adapter); one host sync, at step start."""
        ids = slot_ids.reshape(-1).to("cpu", torch.int64)
        sorted_ids, order = torch.sort(ids, stable=True)
        values, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        segments, start, skipped = [], 0, 0
        for slot, count in zip(values.tolist(), counts.tolist()):
            if slot < 0:
                skipped += count
                continue
            segments.append((slot, start, start + count))
            start += count
        order = order[skipped:]
        if skipped == 0 and bool((order == torch.arange(ids.numel())).all()):
            order = None
        return SlotBatch(ids.numel(), order if order is None else order.to(slot_ids.device), tuple(segments))

    def padded(self, segments: tuple[tuple[int, int, int], ...]) -> tuple[torch.Tensor, ...] | None:
        """Index tensors to run these segments as one batch padded to the longest (cached for the step), or None
        when there is one segment (nothing to batch) or long segments whose padding would more than double the
        rows (prefill); short segments (decode) always batch: there one call beats the padding's extra rows.

        Returns (slots [g], take [g*m] rows of the grouped input, valid [t] rows of the padded result, dest [t]
        rows of the grouped output); padding rows repeat a segment's first row and are dropped by `valid`.
        """
        if segments not in self._padded:
            m = max(hi - lo for _, lo, hi in segments)
            total = sum(hi - lo for _, lo, hi in segments)
            if len(segments) == 1 or (m > SHORT_SEGMENT and len(segments) * m > 2 * total):
                self._padded[segments] = None
            else:
                take, valid, dest = [], [], []
                for j, (_, lo, hi) in enumerate(segments):
                    take += list(range(lo, hi)) + [lo] * (m - (hi - lo))
                    valid += range(j * m, j * m + hi - lo)
                    dest += range(lo, hi)
                device = self.order.device if self.order is not None else "cpu"
                self._padded[segments] = tuple(
                    torch.tensor(t, dtype=torch.long, device=device) for t in ([s for s, _, _ in segments], take, valid, dest)
                )
        return self._padded[segments]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, d] -> [grouped tokens, d] in slot order."""
        return x if self.order is None else x.index_select(0, self.order)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """[grouped tokens, d] -> [tokens, d], zeros for tokens without an adapter."""
        if self.order is None:
            return y
        return y.new_zeros(self.num_tokens, y.shape[-1]).index_copy(0, self.order, y)


def matmul_packed(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x @ W.T with W packed block-diagonal [out, in / blocks] (block j maps input chunk j to output chunk j)."""
    if blocks == 1:
        return torch.matmul(x, weight.t())
    out_dim, block_in = weight.shape
    xb = x.reshape(*x.shape[:-1], blocks, block_in)  # [..., k, in/k]
    wb = weight.reshape(blocks, out_dim // blocks, block_in)  # [k, out/k, in/k]
    yb = torch.einsum("...ki,koi->...ko", xb, wb)  # [..., k, out/k]
    return yb.reshape(*x.shape[:-1], out_dim)


def lora_shrink(
    x: torch.Tensor, weight: torch.Tensor, views: list[FactorView | None], batch: SlotBatch
) -> torch.Tensor:
    """Rank-space activations of grouped tokens: x [n, in] (slot order) -> [n, R], R = weight.shape[1].

    weight: [slots, R, C]; slot s uses weight[s, :rows, :cols] with its block count; columns beyond a slot's
    rows stay zero (so a later all-reduce or all-gather of the whole [n, R] is exact).
    """
    return _grouped_matmul(x, weight, views, batch, None, lambda v: x[:, : v.in_width])


def lora_expand(
    z: torch.Tensor,
    weight: torch.Tensor,
    views: list[FactorView | None],
    scalings: torch.Tensor,
    batch: SlotBatch,
    in_chunks: int = 1,
) -> torch.Tensor:
    """Scaled LoRA outputs of grouped tokens: z [n, in_chunks * R] -> [n, O], O = weight.shape[1].

    scalings: [slots]. in_chunks > 1: z is an all-gather of in_chunks ranks' [n, R] pieces; a slot's rank space
    is the first in_width / in_chunks columns of every piece (S-LoRA column layers).
    """
    n, piece = z.shape[0], z.shape[1] // in_chunks

    def rank_space(v: FactorView) -> torch.Tensor:  # [n, in_width]
        if in_chunks == 1:
            return z[:, : v.in_width]
        return z.reshape(n, in_chunks, piece)[:, :, : v.in_width // in_chunks].reshape(n, v.in_width)

    return _grouped_matmul(z, weight, views, batch, scalings, rank_space)


def _grouped_matmul(x, weight, views, batch, scalings, inputs_for) -> torch.Tensor:
    """out[tokens of slot s, :rows_s] = inputs_s @ W_s.T (* scaling_s), for every slot of the batch.

    Slots with the same view (same rank and blocks: typical for a fleet of adapters) run as one batched matmul
    over their tokens padded to the longest segment, when padding at most doubles the work (decode steps);
    otherwise (long prefill segments) each slot runs its own matmul.
    """
    out = x.new_zeros(x.shape[0], weight.shape[1])  # [n, R or O]
    by_view: dict[FactorView, list[tuple[int, int, int]]] = {}
    for seg in batch.segments:
        if views[seg[0]] is not None:
            by_view.setdefault(views[seg[0]], []).append(seg)
    for v, segs in by_view.items():
        inputs = inputs_for(v)  # [n, in_width]
        padded = batch.padded(tuple(segs))
        if padded is None:
            for slot, lo, hi in segs:
                xs = inputs[lo:hi] if scalings is None else inputs[lo:hi] * scalings[slot]
                out[lo:hi, : v.rows] = matmul_packed(xs, weight[slot, : v.rows, : v.cols], v.blocks)
            continue
        slots, take, valid, dest = padded
        g = slots.numel()
        xg = inputs.index_select(0, take).reshape(g, -1, v.in_width)  # [g, m, in]
        if scalings is not None:
            xg = xg * scalings.index_select(0, slots).to(xg.dtype)[:, None, None]
        wg = weight.index_select(0, slots)[:, : v.rows, : v.cols]  # [g, rows, cols]
        if v.blocks == 1:
            y = torch.bmm(xg, wg.transpose(1, 2))  # [g, m, rows]
        else:
            xb = xg.reshape(g, xg.shape[1], v.blocks, v.cols)  # [g, m, k, in/k]
            wb = wg.reshape(g, v.blocks, v.rows // v.blocks, v.cols)  # [g, k, rows/k, in/k]
            y = torch.einsum("gmki,gkoi->gmko", xb, wb)  # [g, m, k, rows/k]
        out[:, : v.rows].index_copy_(0, dest, y.reshape(-1, v.rows).index_select(0, valid))
    return out
