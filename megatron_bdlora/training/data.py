"""Fine-tuning examples from local files, and the deterministic data-parallel batch sampler that feeds them.

Two formats, one example layout (`input_ids`, `labels`, `loss_mask`, each [seq_length]; `labels[t]` is the token
after `input_ids[t]`, and `loss_mask[t]` says whether that target counts):

- `text`: plain text; documents are separated by form feeds (`DOCUMENT_SEPARATOR`, by convention on a line of its
  own; a file without one is a single document, and newlines around a separator are dropped). Each document is
  tokenized and followed by EOS, the stream is cut into windows of seq_length + 1 tokens that overlap by one token
  (Megatron's GPT packing: every token but the first is a target exactly once), and the tail shorter than a window
  is dropped. The loss mask is all ones.
- `chat`: JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` record a line, rendered with the
  tokenizer's chat template. Only assistant turns are targets: their content and end-of-turn marker, not the
  generation prompt before them nor the whitespace after them. Each record is one example, right-padded
  to seq_length (pad targets are masked) or truncated to seq_length + 1 tokens; truncations are logged.

Nothing is cached: tokenizing the demo data takes seconds, and the result depends only on the file and tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FORMATS = ("text", "chat")
DOCUMENT_SEPARATOR = "\f"  # a form feed (written on its own line) ends one document of a `text` file
COLUMNS = ("input_ids", "labels", "loss_mask")
_TOKENIZE_BATCH = 256  # documents or chat segments per tokenizer call
# The demo data sets tools/prepare_data.py writes under its --out-dir: folder -> format (train/valid files each).
DEMO_DATASETS = {"shakespeare_comedies": "text", "milton": "text", "which_play": "chat"}
_SUFFIX = {"text": ".txt", "chat": ".jsonl"}


def require_data_file(path: str | os.PathLike, key: str) -> None:
    """A missing data file is an error naming the config key and saying how to make the file."""
    path = Path(path)
    if path.is_file():
        return
    dataset = path.parent.name
    demo = DEMO_DATASETS.get(dataset)
    if demo is not None and path.name in {f"{split}{_SUFFIX[demo]}" for split in ("train", "valid")}:
        how = f"make it with `python tools/prepare_data.py --out-dir {path.parent.parent}` (the demo corpora)"
    else:
        how = ("point it at your own file: plain text for data.format=text, or JSONL chat records "
               "{\"messages\": [...]} for data.format=chat (`python tools/prepare_data.py --out-dir data` "
               f"makes the demo corpora {', '.join(f'data/{d}' for d in DEMO_DATASETS)})")
    raise FileNotFoundError(f"data file {path} does not exist ({key}); {how}")


def load_examples(path: str | os.PathLike, fmt: str, tokenizer: Any, seq_length: int) -> datasets.Dataset:
    """Tokenize a local `text` or `chat` file into torch-formatted examples of seq_length tokens."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} for {path}; expected one of {', '.join(FORMATS)}")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer has no EOS token, which {fmt} examples need")
    if fmt == "text":
        columns = _pack_text(path, tokenizer, seq_length)
    else:
        columns = _chat_examples(path, tokenizer, seq_length)
    # lazy: the GPU check's wheelhouse leaves datasets out; the trainer's imports of this module run without it
    import datasets

    dataset = datasets.Dataset.from_dict(
        columns,
        features=datasets.Features(
            input_ids=datasets.Sequence(datasets.Value("int64"), length=seq_length),
            labels=datasets.Sequence(datasets.Value("int64"), length=seq_length),
            loss_mask=datasets.Sequence(datasets.Value("float32"), length=seq_length),
        ),
    )
    return dataset.with_format("torch")


def read_documents(path: Path) -> list[str]:
    """The non-empty documents of a `text` file (split at form-feed lines, surrounding newlines dropped)."""
    text = path.read_text(encoding="utf-8")
    return [doc.strip("\n") for doc in text.split(DOCUMENT_SEPARATOR) if doc.strip()]


def _pack_text(path: Path, tokenizer: Any, seq_length: int) -> dict[str, np.ndarray]:
    """Language-modelling windows over the EOS-joined token stream of all documents."""
    documents = read_documents(path)
    stream: list[int] = []
    for start in range(0, len(documents), _TOKENIZE_BATCH):
        for ids in tokenizer(documents[start : start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
    num_examples = max(len(stream) - 1, 0) // seq_length
    if num_examples == 0:
        raise ValueError(
            f"{path} yields no examples: {len(stream)} tokens, fewer than seq_length + 1 = {seq_length + 1}"
        )
    tokens = np.asarray(stream[: num_examples * seq_length + 1], dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_length + 1)[::seq_length]  # [n, seq+1]
    dropped = len(stream) - (num_examples * seq_length + 1)
    logger.info("%s: %d tokens in %d documents -> %d examples (%d tail tokens dropped)",
                path, len(stream), len(documents), num_examples, dropped)
    return {
        "input_ids": windows[:, :-1],  # [n, seq]
        "labels": windows[:, 1:],  # [n, seq]
        "loss_mask": np.ones((num_examples, seq_length), dtype=np.float32),
    }


def read_chat_records(path: Path) -> list[list[dict[str, str]]]:
    """The `messages` of each JSONL record, checked; errors name the file and line."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{where}: expected an object with a non-empty 'messages' list")
            for message in messages:
                if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str)):
                    raise ValueError(f"{where}: every message needs string 'role' and 'content', got {message!r}")
            if not any(message["role"] == "assistant" for message in messages):
                raise ValueError(f"{where}: no assistant message, so nothing to learn from")
            records.append(messages)
    return records


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_target) pieces that concatenate to the full chat template."""

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )

    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(i, generation_prompt=True)
            _check_prefix(rendered, prompt)
            segments.append((prompt[len(rendered):], False))
            rendered = prompt
        full = render(i + 1)
        _check_prefix(rendered, full)
        piece = full[len(rendered):]
        if message["role"] == "assistant":
            answer = piece.rstrip()  # content + end-of-turn; the newline between turns is not a target
            segments.append((answer, True))
            piece = piece[len(answer):]
        segments.append((piece, False))
        rendered = full
    return [(text, target) for text, target in segments if text]


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise ValueError(
            "the chat template does not render a conversation as a prefix of its continuation, so assistant "
            f"turns cannot be located: {prefix[-80:]!r} is not a prefix of {text[:len(prefix) + 40][-120:]!r}"
        )


def _chat_examples(path: Path, tokenizer: Any, seq_length: int) -> dict[str, np.ndarray]:
    """One padded/truncated example per record, with targets only on assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{path} is a chat file but the tokenizer has no chat template")
    records = read_chat_records(path)
    if not records:
        raise ValueError(f"{path} holds no chat records")
    pieces = [chat_segments(tokenizer, messages) for messages in records]
    flat = [text for segments in pieces for text, _ in segments]
    flat_ids: list[list[int]] = []
    for start in range(0, len(flat), _TOKENIZE_BATCH):
        flat_ids.extend(tokenizer(flat[start : start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"])

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    window = seq_length + 1
    tokens = np.full((len(records), window), pad, dtype=np.int64)  # [n, seq+1]
    targets = np.zeros((len(records), window), dtype=np.float32)  # [n, seq+1]: 1 where a token is to be predicted
    truncated = 0
    cursor = 0
    for row, segments in enumerate(pieces):
        ids: list[int] = []
        mask: list[float] = []
        for _, target in segments:
            ids.extend(flat_ids[cursor])
            mask.extend([float(target)] * len(flat_ids[cursor]))
            cursor += 1
        if len(ids) > window:
            truncated += 1
        ids, mask = ids[:window], mask[:window]
        tokens[row, : len(ids)] = ids
        targets[row, : len(mask)] = mask
    loss_mask = targets[:, 1:]  # [n, seq]: the target of position t is token t + 1
    keep = loss_mask.any(axis=1)
    if truncated:
        logger.warning("%s: %d of %d chat records are longer than seq_length + 1 = %d tokens and were truncated",
                       path, truncated, len(records), window)
    if not keep.all():
        logger.warning("%s: %d records have no assistant token left within seq_length and were dropped",
                       path, int((~keep).sum()))
    if not keep.any():
        raise ValueError(f"{path} yields no examples: no record has an assistant token within seq_length={seq_length}")
    return {"input_ids": tokens[keep, :-1], "labels": tokens[keep, 1:], "loss_mask": loss_mask[keep]}


def collate(dataset: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """A micro-batch of examples as stacked tensors: input_ids/labels int64 and loss_mask float32, [micro, seq]."""
    rows = dataset[list(indices)]
    dtypes = {"input_ids": torch.int64, "labels": torch.int64, "loss_mask": torch.float32}
    return {name: torch.as_tensor(rows[name], dtype=dtypes[name]) for name in COLUMNS}


class GlobalBatchSampler:
    """Which examples each data-parallel rank reads at each step, identical for any dp_size and resumable.

    Global batch `s` is the slice [k * G, (k + 1) * G) of a permutation of all examples, k = s mod steps_per_epoch;
    the permutation is reshuffled every epoch from the seed sequence (seed, epoch). The global batch is cut into
    accumulation_steps * dp_size consecutive micro-batches: micro-step j of rank r takes the one at position
    j * dp_size + r. So concatenating micro-batches in (micro-step, rank) order gives back the global batch, and the
    examples of a step do not depend on dp_size or micro_batch_size. An incomplete last global batch of an epoch
    is skipped.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
    ) -> None:
        for name, value in (("num_examples", num_examples), ("global_batch_size", global_batch_size),
                            ("micro_batch_size", micro_batch_size), ("dp_size", dp_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by micro_batch_size={micro_batch_size} "
                f"* dp_size={dp_size} = {micro_batch_size * dp_size}"
            )
        if num_examples < global_batch_size:
            raise ValueError(f"num_examples={num_examples} is smaller than global_batch_size={global_batch_size}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.accumulation_steps = global_batch_size // (micro_batch_size * dp_size)
        self.steps_per_epoch = num_examples // global_batch_size
        self.next_step = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def epoch(self, step: int) -> int:
        """The epoch (pass over the examples) that a step belongs to."""
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._epoch_order = (epoch, rng.permutation(self.num_examples))
        return self._epoch_order[1]

    def global_batch(self, step: int) -> list[int]:
        """All example indices of a step, in micro-batch order (the same for every dp_size)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return self._permutation(self.epoch(step))[start : start + self.global_batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's accumulation_steps micro-batches of a step, each micro_batch_size example indices."""
        batch = self.global_batch(step)
        m = self.micro_batch_size
        return [
            batch[(j * self.dp_size + self.dp_rank) * m : (j * self.dp_size + self.dp_rank + 1) * m]
            for j in range(self.accumulation_steps)
        ]

    def __iter__(self) -> Iterator[list[list[int]]]:
        """This rank's micro-batches of step next_step, next_step + 1, ... (next_step advances as they are taken)."""
        while True:
            step = self.next_step
            self.next_step += 1
            yield self.micro_batches(step)

    def state_dict(self) -> dict[str, int]:
        """What resuming needs: the next step, and the settings that must match for the steps to mean the same."""
        return {
            "next_step": self.next_step,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state (any dp_size and micro_batch_size: the global batches are the same)."""
        for name in ("num_examples", "global_batch_size", "seed"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"sampler state was saved with {name}={state[name]} but this sampler has {getattr(self, name)}"
                )
        self.next_step = int(state["next_step"])
