"""HF Llama <-> TP-sharded megatron base checkpoint; one table of tensor layouts drives both directions.

A megatron base checkpoint directory MEG:
  MEG/config.json                         the HF config.json, verbatim
  MEG/meta.json                           {"format": "megatron-bdlora-base", "version": 1, "tp", "vocab_size",
                                           "padded_vocab_size", "tie_word_embeddings", "dtype"}
  MEG/<tokenizer files>                   copied from the HF directory (AUX_FILES)
  MEG/tp_rank_{i:02d}/model.safetensors   rank i's shards under megatron GPTModel (local spec) keys

Layouts of rank i at TP degree N (G = KV heads, H = query heads, h = hidden size):
  embedding / output_layer   [Vp/N, h]        rows chunk i of the vocabulary, zero rows padding it to Vp
  linear_qkv                 [(q+2kv)/N, h]   for each of rank i's G/N query groups: its H/G q heads, k head, v head
  linear_fc1                 [2 ffn/N, h]     [gate rows chunk i; up rows chunk i]
  linear_proj, linear_fc2    [h, d_in/N]      input columns chunk i
  layer norms                [h]              replicated
Both codebases rotate halves for RoPE, so q/k rows need no permutation.

Memory: HF -> megatron builds one rank at a time from slices of the HF tensors (1/N of the model in memory);
megatron -> HF holds one output file (at most `max_shard_bytes`) plus one tensor.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_bdlora.atomic import atomic_directory
from megatron_bdlora.jsonfiles import read_json_object
from megatron_bdlora.sharding import LayerKind
from megatron_bdlora.targets import cfg_field, check_tp_layout, llama_projections

FORMAT = "megatron-bdlora-base"
VERSION = 1
# Files copied unchanged in both directions when present (tokenizer, chat template, generation defaults).
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
MAX_SHARD_BYTES = 2 * 10**9
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
# HF tensors that carry no weights of their own and are skipped when present.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_MEGATRON_MODULE = {"self_attn": "self_attention", "mlp": "mlp"}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# read(name, dim, start, stop): rows (dim 0) or columns (dim 1) start:stop of an HF tensor; dim None: all of it
Reader = Callable[[str, "int | None", int, int], torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the tensor or field."""


# --------------------------------------------------------------------------------------------------------------
# Config and layouts


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rows stored: the next multiple of TP (vocab-parallel embedding and output layer)."""
    return -(-vocab_size // tp) * tp


@dataclass(frozen=True)
class Layout:
    """How one megatron tensor is cut from HF tensors at TP degree N, and glued back."""

    megatron: str
    hf: tuple[str, ...]  # HF tensors fused into it, in fused order
    hf_shapes: tuple[tuple[int, ...], ...]
    split_dim: int | None  # None: replicated; 0: column parallel (output rows); 1: row parallel (input columns)
    groups: int | None = None  # dim 0: parts interleaved per group (qkv: KV heads); None: one group per rank
    padded_rows: int | None = None  # dim 0, single part: zero rows appended up to this count (vocabulary)

    def _rows(self) -> list[int]:
        """Stored rows of each part (padding included)."""
        return [self.padded_rows or shape[0] for shape in self.hf_shapes]

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        """Shape of every rank's shard."""
        shape = self.hf_shapes[0]
        if self.split_dim is None:
            return tuple(shape)
        if self.split_dim == 1:
            return (shape[0], shape[1] // tp)
        return (sum(self._rows()) // tp, shape[1])

    def shard(self, read: Reader, rank: int, tp: int) -> torch.Tensor:
        """Rank `rank`'s shard, reading only that rank's slice of each HF tensor."""
        if self.split_dim is None:
            return read(self.hf[0], None, 0, 0)
        if self.split_dim == 1:
            n = self.hf_shapes[0][1] // tp
            return read(self.hf[0], 1, rank * n, (rank + 1) * n)  # [d_out, d_in/N]
        local = (self.groups or tp) // tp  # groups held by one rank
        pieces = []
        for name, shape, rows in zip(self.hf, self.hf_shapes, self._rows()):
            n = rows // tp
            start = min(rank * n, shape[0])
            piece = read(name, 0, start, min(start + n, shape[0]))  # [<= n, h]
            if piece.shape[0] < n:  # vocabulary padding
                piece = torch.cat([piece, piece.new_zeros(n - piece.shape[0], *piece.shape[1:])])
            pieces.append(piece.reshape(local, n // local, -1))  # [groups/N, rows/groups, h]
        return torch.cat(pieces, dim=1).reshape(-1, self.hf_shapes[0][1])  # [sum rows / N, h]

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The HF tensors (in `hf` order) from all ranks' shards (in rank order)."""
        tp = len(shards)
        if self.split_dim is None:
            for rank, shard in enumerate(shards[1:], start=1):
                if not torch.equal(shard, shards[0]):
                    raise CheckpointError(f"replicated tensor {self.megatron} differs between tp ranks 0 and {rank}")
            return [shards[0]]
        if self.split_dim == 1:
            return [torch.cat(shards, dim=1)]  # [d_out, d_in]
        local = (self.groups or tp) // tp
        per_group = [rows // tp // local for rows in self._rows()]
        h = self.hf_shapes[0][1]
        # per rank: the parts, each [groups/N, rows/groups, h]
        split = [shard.reshape(local, sum(per_group), h).split(per_group, dim=1) for shard in shards]
        out = []
        for j, shape in enumerate(self.hf_shapes):
            full = torch.cat([parts[j].reshape(-1, h) for parts in split])  # [rows (padded), h]
            out.append(full[: shape[0]].clone() if full.shape[0] != shape[0] else full)
        return out


def layouts(hf_config: dict, tp: int) -> list[Layout]:
    """Every tensor of the megatron base checkpoint at TP degree `tp`, in file order."""
    projections = llama_projections(hf_config)
    h = cfg_field(hf_config, "hidden_size")
    vocab = cfg_field(hf_config, "vocab_size")
    heads = cfg_field(hf_config, "num_attention_heads")
    groups = {"linear_qkv": cfg_field(hf_config, "num_key_value_heads", heads)}
    fused: dict[str, list[str]] = {}  # megatron layer -> HF projections, in fused order
    for name, p in projections.items():
        fused.setdefault(p.megatron_layer, []).append(name)
    vocab_layout = dict(hf_shapes=((vocab, h),), split_dim=0, padded_rows=padded_vocab_size(vocab, tp))

    table = [Layout("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), **vocab_layout)]
    for layer in range(cfg_field(hf_config, "num_hidden_layers")):
        hf_pre, meg_pre = f"model.layers.{layer}.", f"decoder.layers.{layer}."

        def norm(meg: str, hf: str) -> Layout:
            return Layout(f"{meg_pre}{meg}.weight", (f"{hf_pre}{hf}.weight",), ((h,),), None)

        table.append(norm("input_layernorm", "input_layernorm"))
        for meg_layer, names in fused.items():
            if meg_layer == "linear_fc1":
                table.append(norm("pre_mlp_layernorm", "post_attention_layernorm"))
            first = projections[names[0]]
            table.append(
                Layout(
                    megatron=f"{meg_pre}{_MEGATRON_MODULE[first.hf_module]}.{meg_layer}.weight",
                    hf=tuple(f"{hf_pre}{first.hf_module}.{n}.weight" for n in names),
                    hf_shapes=tuple((projections[n].d_out, projections[n].d_in) for n in names),
                    split_dim=0 if first.kind is LayerKind.COLUMN else 1,
                    groups=groups.get(meg_layer),
                )
            )
    table.append(Layout("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),), None))
    if not hf_config.get("tie_word_embeddings", False):
        table.append(Layout("output_layer.weight", ("lm_head.weight",), **vocab_layout))
    return table


# --------------------------------------------------------------------------------------------------------------
# Reading and checking tensors


class _TensorFiles:
    """Tensors spread over safetensors files, read lazily by name (one open handle per file)."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack):
        self._files, self._stack, self._handles = files, stack, {}

    def _handle(self, name: str) -> Any:
        path = self._files[name]
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path} (holding tensor {name}) does not exist")
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        st = self._handle(name).get_slice(name).get_dtype()
        return _ST_DTYPES.get(st, st.lower())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        if dim is None:
            return self._handle(name).get_tensor(name)
        piece = self._handle(name).get_slice(name)
        return (piece[start:stop] if dim == 0 else piece[:, start:stop]).contiguous()


def _file_names(path: Path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


@contextlib.contextmanager
def _open_hf(hf_dir: Path) -> Iterator[_TensorFiles]:
    """The tensors of an HF checkpoint: sharded (with an index json) or one model.safetensors."""
    if (hf_dir / HF_INDEX).is_file():
        weight_map = _read_json(hf_dir / HF_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{hf_dir / HF_INDEX} has no weight_map")
        files = {name: hf_dir / file for name, file in weight_map.items()}
    elif (hf_dir / HF_SINGLE).is_file():
        files = {name: hf_dir / HF_SINGLE for name in _file_names(hf_dir / HF_SINGLE)}
    else:
        raise CheckpointError(f"no {HF_SINGLE} or {HF_INDEX} in {hf_dir} (only safetensors checkpoints are supported)")
    with contextlib.ExitStack() as stack:
        yield _TensorFiles(files, stack)


def _rank_file(meg_dir: Path, rank: int) -> Path:
    return meg_dir / f"tp_rank_{rank:02d}" / "model.safetensors"


@contextlib.contextmanager
def _open_rank(meg_dir: Path, rank: int, table: list[Layout], tp: int) -> Iterator[_TensorFiles]:
    """One rank's shard file, its tensor names and shapes checked against the layouts."""
    path = _rank_file(meg_dir, rank)
    if not path.is_file():
        raise CheckpointError(f"megatron checkpoint {meg_dir} has no shard file for tp rank {rank} ({path})")
    with contextlib.ExitStack() as stack:
        files = _TensorFiles({name: path for name in _file_names(path)}, stack)
        expected = {lay.megatron: lay.shard_shape(tp) for lay in table}
        _check_tensors(f"megatron checkpoint {path}", expected, files)
        yield files


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_tensors(
    where: str,
    expected: dict[str, tuple[int, ...]],
    files: _TensorFiles,
    ignored: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Names and shapes must match exactly (tensors in `ignored` may also be present); every mismatch is named."""
    present = set(files.names())
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected) - set(ignored))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    wrong = [
        f"tensor {name} has shape {files.shape(name)}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in present and files.shape(name) != tuple(shape)
    ]
    problems += wrong[:8] + ([f"... ({len(wrong) - 8} more wrong shapes)"] if len(wrong) > 8 else [])
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Files around the tensors


def _read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _copy_config_and_aux(src: Path, dst: Path) -> None:
    """config.json verbatim plus whichever tokenizer/generation files exist."""
    shutil.copyfile(src / "config.json", dst / "config.json")
    for name in AUX_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _check_distinct(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise CheckpointError(f"output directory {out} is the input directory")


class _HFShardWriter:
    """Writes HF safetensors files of at most `max_bytes` each: one model.safetensors, or several plus an index."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".part-{len(self.written):05d}.safetensors"
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.written.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        if self.buffer:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.out_dir / HF_SINGLE)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        _write_json(self.out_dir / HF_INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})


# --------------------------------------------------------------------------------------------------------------
# Public API


def convert_hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, tp: int, overwrite: bool = False, progress: bool = True
) -> Path:
    """Shard an HF Llama checkpoint into a megatron base checkpoint for TP degree `tp`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_distinct(hf_dir, out_dir)
    config = _read_json(hf_dir / "config.json")
    check_tp_layout(config, tp, CheckpointError)
    table = layouts(config, tp)
    tied = bool(config.get("tie_word_embeddings", False))
    with _open_hf(hf_dir) as src:
        expected = {name: shape for lay in table for name, shape in zip(lay.hf, lay.hf_shapes)}
        ignored = {n for n in src.names() if _IGNORED_HF.fullmatch(n)} | ({"lm_head.weight"} if tied else set())
        _check_tensors(f"HF checkpoint {hf_dir}", expected, src, ignored)
        for lay in table:
            dtypes = {src.dtype(name) for name in lay.hf}
            if len(dtypes) > 1:
                raise CheckpointError(
                    f"tensors {', '.join(lay.hf)} fused into {lay.megatron} differ in dtype: {sorted(dtypes)}"
                )
        vocab = config["vocab_size"]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "tp": tp,
            "vocab_size": vocab,
            "padded_vocab_size": padded_vocab_size(vocab, tp),
            "tie_word_embeddings": tied,
            "dtype": src.dtype("model.embed_tokens.weight"),
        }
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            _copy_config_and_aux(hf_dir, tmp)
            _write_json(tmp / "meta.json", meta)
            with tqdm(total=tp * len(table), desc=f"HF -> megatron (tp={tp})", unit="tensor",
                      disable=not progress) as bar:
                for rank in range(tp):
                    state = {}
                    for lay in table:
                        state[lay.megatron] = lay.shard(src.read, rank, tp)
                        bar.update()
                    _rank_file(tmp, rank).parent.mkdir()
                    save_file(state, _rank_file(tmp, rank), metadata={"format": "pt"})
                    del state
    return out_dir


def read_megatron_meta(meg_dir: str | Path) -> dict:
    """meta.json of a megatron base checkpoint (format and version checked)."""
    meg_dir = Path(meg_dir)
    meta = _read_json(meg_dir / "meta.json")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{meg_dir} is not a {FORMAT} checkpoint of version {VERSION} "
            f"(meta.json has format={meta.get('format')!r}, version={meta.get('version')!r})"
        )
    return meta


def _megatron_checkpoint(meg_dir: Path) -> tuple[dict, dict, list[Layout]]:
    """(meta, HF config, layouts) of a megatron base checkpoint, meta checked against the config."""
    meta = read_megatron_meta(meg_dir)
    config = _read_json(meg_dir / "config.json")
    tp = meta.get("tp")
    check_tp_layout(config, tp, CheckpointError)
    vocab = config.get("vocab_size")
    derived = {
        "vocab_size": vocab,
        "padded_vocab_size": padded_vocab_size(vocab, tp),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    for key, value in derived.items():
        if meta.get(key) != value:
            raise CheckpointError(f"{meg_dir}/meta.json has {key}={meta.get(key)!r}, but config.json implies {value!r}")
    return meta, config, layouts(config, tp)


def load_megatron_rank_state(meg_dir: str | Path, tp_rank: int, tp: int | None = None) -> dict[str, torch.Tensor]:
    """One TP rank's base weights under megatron GPTModel keys; `tp`, if given, must match the checkpoint's."""
    meg_dir = Path(meg_dir)
    meta, _, table = _megatron_checkpoint(meg_dir)
    if tp is not None and tp != meta["tp"]:
        raise CheckpointError(f"{meg_dir} is sharded for tp={meta['tp']}, but the model runs with tp={tp}")
    if not 0 <= tp_rank < meta["tp"]:
        raise CheckpointError(f"tp_rank={tp_rank} is out of range for {meg_dir} (tp={meta['tp']})")
    with _open_rank(meg_dir, tp_rank, table, meta["tp"]) as files:
        return {lay.megatron: files.read(lay.megatron) for lay in table}


def convert_megatron_to_hf(
    meg_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Reassemble a megatron base checkpoint into an HF Llama checkpoint (vocabulary padding dropped)."""
    meg_dir, out_dir = Path(meg_dir), Path(out_dir)
    _check_distinct(meg_dir, out_dir)
    meta, _, table = _megatron_checkpoint(meg_dir)
    tp = meta["tp"]
    with contextlib.ExitStack() as stack:
        ranks = [stack.enter_context(_open_rank(meg_dir, rank, table, tp)) for rank in range(tp)]
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            _copy_config_and_aux(meg_dir, tmp)
            writer = _HFShardWriter(tmp, max_shard_bytes)
            for lay in tqdm(table, desc=f"megatron (tp={tp}) -> HF", unit="tensor", disable=not progress):
                for name, tensor in zip(lay.hf, lay.merge([files.read(lay.megatron) for files in ranks])):
                    writer.add(name, tensor)
            writer.close()
    return out_dir
