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


GATHER_TOKENS = 64  # up to this many tokens, adjacent same-shape slots run as one matmul with gathered factors


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
    _cache: dict = field(default_factory=dict, compare=False, repr=False)  # per-step cache of plan()

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

    def plan(self, views: list[FactorView | None], width: int) -> tuple[bool, list[tuple]]:
        """How one factor stack runs this step (cached per views list; views change only between steps).

        Returns (whether one group fills every row and column of the output, groups); a group is
        (view, first row, end row, slot of each row or None for one matmul per segment, its segments).
        """
        key = (id(views), width)
        if key not in self._cache:
            runs: list[tuple[FactorView, list[tuple[int, int, int]]]] = []
            for seg in self.segments:
                v = views[seg[0]]
                if v is None:
                    continue
                if runs and runs[-1][0] == v and runs[-1][1][-1][2] == seg[1]:
                    runs[-1][1].append(seg)
                else:
                    runs.append((v, [seg]))
            groups = []
            for v, segs in runs:
                lo, hi = segs[0][1], segs[-1][2]
                gather = len(segs) > 1 and hi - lo <= GATHER_TOKENS
                slots = [slot for slot, s_lo, s_hi in segs for _ in range(s_hi - s_lo)] if gather else None
                device = self.order.device if self.order is not None else "cpu"
                slots = None if slots is None else torch.tensor(slots, dtype=torch.long, device=device)
                groups.append((v, lo, hi, slots, segs))
            n = self.grouped_tokens
            fills_all = len(groups) == 1 and groups[0][1:3] == (0, n) and groups[0][0].rows == width
            fills_all = fills_all and (groups[0][3] is not None or len(groups[0][4]) == 1)
            self._cache[key] = (fills_all, groups)
        return self._cache[key]

    @property
    def grouped_tokens(self) -> int:
        return self.num_tokens if self.order is None else self.order.numel()

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

    Decode-sized batches: adjacent slots with the same view (same rank and blocks: typical for a fleet of
    adapters) run as one batched matmul with each token's own factor gathered (BGMV, as Punica / S-LoRA do for
    decode); longer segments (prefill) run one matmul per slot.
    """
    n, width = x.shape[0], weight.shape[1]
    fills_all, groups = batch.plan(views, width)
    out = None if fills_all else x.new_zeros(n, width)  # [n, R or O]
    for v, lo, hi, slots, segs in groups:
        inputs = inputs_for(v)  # [n, in_width]
        if slots is not None:  # gathered factors, one matmul for the group
            xs = inputs[lo:hi]
            if scalings is not None:
                xs = xs * scalings.index_select(0, slots).to(xs.dtype)[:, None]
            wt = weight.index_select(0, slots)[:, : v.rows, : v.cols]  # [t, rows, cols]
            if v.blocks == 1:
                y = torch.bmm(xs[:, None, :], wt.transpose(1, 2))  # [t, 1, rows]
            else:
                xb, wb = xs.reshape(hi - lo, v.blocks, v.cols), wt.reshape(hi - lo, v.blocks, v.rows // v.blocks, v.cols)
                y = torch.einsum("tki,tkoi->tko", xb, wb)  # [t, k, rows/k]
            y = y.reshape(hi - lo, v.rows)
            if out is None:
                return y
            out[lo:hi, : v.rows] = y
            continue
        for slot, s_lo, s_hi in segs:
            xs = inputs[s_lo:s_hi] if scalings is None else inputs[s_lo:s_hi] * scalings[slot]
            y = matmul_packed(xs, weight[slot, : v.rows, : v.cols], v.blocks)
            if out is None:
                return y  # the only segment, covering every row and column
            out[s_lo:s_hi, : v.rows] = y
    return x.new_zeros(n, width) if out is None else out
