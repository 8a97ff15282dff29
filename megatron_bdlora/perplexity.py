"""Held-out perplexity of a base model and its adapters on several corpora: the demo's table and its verdict.

Every cell is scored by the trainer's own evaluation (`Trainer.evaluate`: teacher forcing over the first
`logging.eval_batches` micro-batches of a `text` file packed exactly as in training, mean token NLL, exp), so a
number here means the same as a run's `valid_ppl`. The model is the TP-sharded megatron model with the adapter
loaded as `megatron_bdlora.generate` loads it (no merge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from megatron.core import parallel_state
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_bdlora.generate import load_model_for_generation
from megatron_bdlora.training.config import TrainConfig
from megatron_bdlora.training.data import load_examples
from megatron_bdlora.training.loop import Trainer

BASE = "base"  # the row of the model without an adapter

Table = dict[str, dict[str, float]]  # model (row) -> corpus (column) -> perplexity


@dataclass(frozen=True)
class PerplexitySpec:
    """What to score: the base checkpoint, adapters by row name, valid files by column name, and the packing."""

    megatron_dir: Path
    adapters: dict[str, str]  # row name -> adapter directory (native or PEFT); the base row is always added
    corpora: dict[str, str]  # column name -> held-out `text` file
    # data.seq_length, parallel.micro_batch_size, logging.eval_batches, model.dtype
    cfg: TrainConfig = field(default_factory=TrainConfig)


class _EvalView:
    """The attributes `Trainer.evaluate` reads, filled from a model and a data set instead of a training run.

    Trainer.evaluate is a method of the whole training state (DeepSpeed engine, sampler, ...); building that
    for a frozen model would load an optimizer for nothing, so the view lends it just what it uses.
    """

    def __init__(self, model: torch.nn.Module, data: Any, cfg: TrainConfig, info: Any) -> None:
        self.engine, self.cfg, self.info = model, cfg, info
        self.run_info = SimpleNamespace(valid_data=data, dp=info.dp_size)
        self.dp_group = parallel_state.get_data_parallel_group()
        self._dp_sum = Trainer._dp_sum.__get__(self)  # sums over the data-parallel group, as in training

    def perplexity(self) -> float:
        return Trainer.evaluate(self)["valid_ppl"]


def perplexity_worker(info: Any, spec: PerplexitySpec, progress: bool = True) -> Table:
    """Every rank: the table of held-out perplexities (rows: base, then spec.adapters; columns: spec.corpora)."""
    cfg = spec.cfg
    tokenizer = AutoTokenizer.from_pretrained(spec.megatron_dir)
    data = {name: load_examples(path, "text", tokenizer, cfg.data.seq_length) for name, path in spec.corpora.items()}
    rows: dict[str, str | None] = {BASE: None, **spec.adapters}
    table: Table = {}
    with tqdm(total=len(rows) * len(data), desc="perplexity", unit="cell",
              disable=not progress or info.rank != 0) as bar:
        for row, adapter in rows.items():
            model = load_model_for_generation(
                Path(spec.megatron_dir), info.tp_size, info.tp_rank, None if adapter is None else Path(adapter),
                cfg.model.dtype,
            )
            table[row] = {}
            for column, examples in data.items():
                table[row][column] = _EvalView(model, examples, cfg, info).perplexity()
                bar.update(1)
            del model
    return table


def own_corpus_failures(table: Table, own: dict[str, str]) -> list[str]:
    """Why an adapter is not the best model on its own corpus (empty when each one is); own: row -> column."""
    failures = []
    for row, column in own.items():
        if row not in table or column not in table[row]:
            raise KeyError(f"perplexity table has no cell ({row!r}, {column!r}); rows {list(table)}, "
                           f"columns {list(next(iter(table.values()), {}))}")
        rivals = {other: values[column] for other, values in table.items() if other != row}
        best_rival = min(rivals, key=rivals.get)
        if not table[row][column] < rivals[best_rival]:
            failures.append(
                f"adapter {row!r} has perplexity {table[row][column]:.2f} on {column!r}, not below "
                f"{best_rival!r}'s {rivals[best_rival]:.2f}"
            )
    return failures


def format_table(table: Table) -> str:
    """Fixed-width table (rows: models, columns: corpora), the best value of each column starred."""
    columns = list(next(iter(table.values())))
    best = {c: min(table[r][c] for r in table) for c in columns}

    def cell(r: str, c: str) -> str:
        return f"{table[r][c]:.2f}" + ("*" if table[r][c] == best[c] else " ")

    head = ["model \\ valid ppl", *columns]
    body = [[row, *(cell(row, c) for c in columns)] for row in table]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def fmt(line: list[str]) -> str:
        return "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in body)])

