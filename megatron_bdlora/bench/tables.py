"""Plain-text tables of the benchmarks (fixed width, so that they paste into Markdown as a code block)."""

from __future__ import annotations

from collections.abc import Sequence

# collective names as the tables abbreviate them (megatron_bdlora.comm_count's keys are torch.distributed's names)
COLLECTIVE_SHORT = {"all_reduce": "AR", "all_gather_into_tensor": "AG", "all_gather": "AG",
                    "reduce_scatter_tensor": "RS", "reduce_scatter": "RS", "broadcast": "BC"}


def fixed_width_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned numbers, a dashed rule under the head; one table style for all."""
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(b) for b in body])


def collectives_label(counts: dict[str, int] | None) -> str:
    """'34 (32AR+2AG)': total, then the kinds; '0' when none; '-' when not counted."""
    if counts is None:
        return "-"
    total = sum(counts.values())
    if not total:
        return "0"
    parts = [f"{n if n > 1 else ''}{COLLECTIVE_SHORT.get(op, op)}" for op, n in sorted(counts.items())]
    return f"{total} ({'+'.join(parts)})"
