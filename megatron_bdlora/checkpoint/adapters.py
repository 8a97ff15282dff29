"""Native adapter checkpoint: one safetensors file per TP rank holding that rank's slice of every LoRA factor.

Layout of a checkpoint directory:

    adapter_manifest.json     settings, base-model shape (and its hash), tp, mode, nblocks, dtype
    rank_00.safetensors       keys layers.{l}.{proj}.lora_A / .lora_B: rank 0's slice of the stored form
    rank_01.safetensors       ...

A factor's *stored* form is PEFT's layout (sharding.py): dense, or packed (out, in / nblocks) when
block-diagonal. Rank i's file holds exactly `plan.a.shard(A_full, i)` / `plan.b.shard(B_full, i)`, so a
rank loads its own file and nothing else; replicated factors are written to every file.

Readers (native here, PEFT in peft.py) parse `AdapterFiles`: an adapter directory's files read into memory once,
with a sha256 digest over them, so that what is validated, hashed and served is one reading of the disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from megatron_bdlora.atomic import atomic_directory
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.jsonfiles import parse_json_object, read_json_object
from megatron_bdlora.sharding import Mode, ShardingPlan
from megatron_bdlora.targets import cfg_field, lora_plan

FORMAT = "megatron-bdlora-adapter"
FORMAT_VERSION = 1
# The files that make an adapter directory: ours (the manifest beside one rank file per TP rank, rank_file_name)
# and PEFT's (its config beside one weights file).
MANIFEST_NAME = "adapter_manifest.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILE = re.compile(rf"{re.escape(MANIFEST_NAME)}|rank_\d+\.safetensors|{re.escape(PEFT_CONFIG_NAME)}|"
                          rf"{re.escape(PEFT_WEIGHTS_NAME)}")  # every file an adapter is made of
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
)

Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A, B) stored forms


class AdapterCheckpointError(ValueError):
    """An adapter checkpoint that cannot be read, or that does not fit the model it is loaded into."""


def rank_file_name(tp_rank: int) -> str:
    """File of one TP rank's factor slices."""
    return f"rank_{tp_rank:02d}.safetensors"


def factor_key(layer: int, proj: str, factor: str) -> str:
    """Key of a factor (`factor` is 'A' or 'B') in a native rank file."""
    return f"layers.{layer}.{proj}.lora_{factor}"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the manifest's spelling of a dtype."""
    return str(dtype).removeprefix("torch.")


def base_shape(hf_config: Any) -> dict[str, int]:
    """The base-model fields an adapter depends on, from an HF Llama config (object or dict) or a shape dict."""
    heads = cfg_field(hf_config, "num_attention_heads")
    hidden = cfg_field(hf_config, "hidden_size")
    defaults = {"num_key_value_heads": heads, "head_dim": hidden // heads}
    return {k: int(cfg_field(hf_config, k, defaults.get(k))) for k in SHAPE_FIELDS}


def shape_hash(shape: dict[str, int]) -> str:
    """sha256 of the canonical JSON of a base shape: two models take the same adapters iff their hashes match."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_base_shape(shape: dict[str, int], base_config: Any, source: str | os.PathLike) -> None:
    """Refuse an adapter trained for another base model: the one base-model check of every adapter load."""
    expected = base_shape(base_config)
    if shape != expected:
        diff = {k: (shape.get(k), expected[k]) for k in SHAPE_FIELDS if shape.get(k) != expected[k]}
        raise AdapterCheckpointError(
            f"{source}: adapter was trained for another base model: adapter shape {shape}, model shape "
            f"{expected} (differing (adapter, model): {diff})"
        )


def read_base_config(path: str | os.PathLike) -> dict[str, Any]:
    """An HF config dict from a config.json file or from a model directory containing one."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"base config {file} does not exist (pass an HF config.json or a model directory)")
    return read_json_object(file, AdapterCheckpointError)


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory's files, read into memory once: what is parsed, hashed and served is that one reading,
    however the files change on disk afterwards. Other files in the directory (logs, optimizer state) are not read."""

    directory: Path
    contents: dict[str, bytes]  # file name -> bytes

    @classmethod
    def read(cls, directory: str | os.PathLike) -> AdapterFiles:
        """Every adapter file (ADAPTER_FILE) directly in `directory`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {directory} does not exist or is not a directory")
        names = sorted(p.name for p in directory.iterdir() if ADAPTER_FILE.fullmatch(p.name) and p.is_file())
        return cls(directory, {name: (directory / name).read_bytes() for name in names})

    @classmethod
    def of(cls, source: str | os.PathLike | AdapterFiles) -> AdapterFiles:
        """Files already read, or a directory to read now (the path-based API of every reader)."""
        return source if isinstance(source, AdapterFiles) else cls.read(source)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 over the sorted (name, bytes) pairs: equal iff the same adapter files hold the same bytes."""
        h = hashlib.sha256()
        for name in sorted(self.contents):
            data = self.contents[name]
            h.update(f"{name}\0{len(data)}\0".encode())  # lengths: no two file sets hash the same byte stream
            h.update(data)
        return h.hexdigest()

    def path(self, name: str) -> Path:
        """Where a file was read from (for error messages)."""
        return self.directory / name

    def has(self, name: str) -> bool:
        return name in self.contents

    def json_object(self, name: str) -> dict[str, Any]:
        """A JSON object file; FileNotFoundError if absent, AdapterCheckpointError if not valid JSON or no object."""
        path = self.path(name)
        if name not in self.contents:
            raise FileNotFoundError(f"{path} does not exist")
        return parse_json_object(self.contents[name], path, AdapterCheckpointError)

    def safetensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """All tensors and the metadata of a safetensors file; a missing or corrupt file is an error naming it."""
        path = self.path(name)
        if name not in self.contents:
            raise FileNotFoundError(f"weights file {path} does not exist")
        data = self.contents[name]
        try:
            tensors = load_safetensors_bytes(data)
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # valid: load() parsed it
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            msg = " ".join(str(e).split())
            raise AdapterCheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({msg})") from None
        return tensors, dict(header.get("__metadata__") or {})


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str, hint: str = ""
) -> None:
    """Exactly the expected keys with the expected shapes, floating point; errors name source, key and shapes."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterCheckpointError(
            f"{source}: missing tensor {missing[0]!r}{more}, expected shape {list(expected[missing[0]])}"
        )
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise AdapterCheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}{more}")
    dtypes = set()
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(shape):
            raise AdapterCheckpointError(
                f"{source}: tensor {k!r} has shape {list(t.shape)}, expected {list(shape)}{hint}"
            )
        if not t.is_floating_point():
            raise AdapterCheckpointError(f"{source}: tensor {k!r} has dtype {dtype_name(t.dtype)}, expected floating")
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise AdapterCheckpointError(f"{source}: mixed dtypes {sorted(dtype_name(d) for d in dtypes)}")


@dataclass
class AdapterCheckpoint:
    """A whole adapter in memory: settings, base-model shape, TP degree and the full stored form of every factor."""

    settings: LoRASettings  # nblocks resolved (never None) in block-diagonal mode
    base_shape: dict[str, int]  # base_shape(hf_config); an HF config object or dict is accepted and reduced
    tp: int
    factors: Factors = field(default_factory=dict)
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        self.base_shape = base_shape(self.base_shape)
        if self.settings.mode is Mode.BLOCK_DIAGONAL and self.settings.nblocks is None:
            self.settings = dataclasses.replace(self.settings, nblocks=self.tp)
        self.settings = dataclasses.replace(self.settings, targets=canonical_targets(self.settings.targets))

    @property
    def num_layers(self) -> int:
        return self.base_shape["num_hidden_layers"]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.factors.values()))[0].dtype if self.factors else torch.float32

    def plans(self, tp: int | None = None) -> dict[str, ShardingPlan]:
        """The sharding plan of every target projection at this TP degree (default: the checkpoint's)."""
        tp = self.tp if tp is None else tp
        try:
            return {p: lora_plan(self.base_shape, p, self.settings, tp) for p in self.settings.targets}
        except ValueError as e:
            s = self.settings
            blocks = f", nblocks {s.nblocks}" if s.mode is Mode.BLOCK_DIAGONAL else ""
            raise AdapterCheckpointError(
                f"adapter (mode {s.mode.value}, rank {s.rank}{blocks}) cannot be sharded at tp={tp}: {e}"
            ) from None

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Native key -> full stored shape, for every layer and target."""
        return _shapes(self.plans(), self.num_layers, lambda f: f.full_shape)

    def validate(self) -> None:
        """Every (layer, target) present with the stored shapes the plan expects."""
        flat = {factor_key(layer, p, n): t for (layer, p), ab in self.factors.items() for n, t in zip("AB", ab)}
        check_tensors(flat, self.full_shapes(), "adapter")

    def rank_state(self, tp_rank: int) -> dict[str, torch.Tensor]:
        """This rank's slice of every factor, keyed as in its rank file."""
        plans = self.plans()
        state = {}
        for (layer, proj), (a, b) in sorted(self.factors.items()):
            plan = plans[proj]
            state[factor_key(layer, proj, "A")] = plan.a.shard(a, tp_rank).contiguous()
            state[factor_key(layer, proj, "B")] = plan.b.shard(b, tp_rank).contiguous()
        return state

    def manifest(self) -> dict[str, Any]:
        """The adapter_manifest.json content."""
        s = self.settings
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": {
                "name_or_path": self.base_model_name,
                "shape": self.base_shape,
                "shape_hash": shape_hash(self.base_shape),
            },
            "targets": list(s.targets),
            "rank": s.rank,
            "alpha": s.alpha,
            "use_rslora": s.use_rslora,
            "scaling": s.scaling,
            "dropout": s.dropout,
            "mode": s.mode.value,
            "nblocks": s.nblocks if s.mode is Mode.BLOCK_DIAGONAL else None,
            "tp": self.tp,
            "dtype": dtype_name(self.dtype),
            "num_layers": self.num_layers,
        }


def canonical_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Targets in the layer's order (q, k, v, o, gate, up, down), so manifests compare equal."""
    return tuple(t for t in ALL_TARGETS if t in targets)


def _shapes(plans: dict[str, ShardingPlan], num_layers: int, shape_of) -> dict[str, tuple[int, ...]]:
    """Native key -> shape_of(FactorShard) over all layers and targets."""
    return {
        factor_key(layer, p, n): shape_of(getattr(plan, n.lower()))
        for layer in range(num_layers)
        for p, plan in plans.items()
        for n in "AB"
    }


def save_native(ckpt: AdapterCheckpoint, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a checkpoint directory atomically, slicing every full factor for each rank through its plan."""
    ckpt.validate()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for tp_rank in range(ckpt.tp):
            meta = {"format": FORMAT, "tp_rank": str(tp_rank), "tp": str(ckpt.tp)}
            save_file(ckpt.rank_state(tp_rank), str(tmp / rank_file_name(tp_rank)), metadata=meta)
        (tmp / MANIFEST_NAME).write_text(json.dumps(ckpt.manifest(), indent=2) + "\n")
    return Path(out_dir)


def gather_rank_states(
    settings: LoRASettings,
    hf_config: Any,
    tp: int,
    rank_states: list[dict[str, torch.Tensor]],
    *,
    base_model_name: str | None = None,
    sources: list[str] | None = None,
) -> AdapterCheckpoint:
    """The whole adapter from every rank's slices (validated, replicas checked equal): the inverse of rank_state."""
    ckpt = AdapterCheckpoint(settings, hf_config, tp, {}, base_model_name)
    if len(rank_states) != tp:
        raise AdapterCheckpointError(f"got {len(rank_states)} rank states, expected tp={tp}")
    sources = sources or [f"rank {i} state" for i in range(tp)]
    plans = ckpt.plans()
    local = _shapes(plans, ckpt.num_layers, lambda f: f.local_shape)
    for state, source in zip(rank_states, sources):
        check_tensors(state, local, source)
    for layer in range(ckpt.num_layers):
        for proj, plan in plans.items():
            pair = []
            for n, shard in (("A", plan.a), ("B", plan.b)):
                key = factor_key(layer, proj, n)
                shards = [state[key] for state in rank_states]
                if shard.split_dim is None:
                    for i in range(1, tp):
                        if not torch.equal(shards[i], shards[0]):
                            diff = (shards[i].float() - shards[0].float()).abs().max().item()
                            raise AdapterCheckpointError(
                                f"replicated factor {key!r} differs between {sources[0]} and {sources[i]} "
                                f"(max |diff| {diff:.6g}): replicas must be identical"
                            )
                pair.append(shard.unshard(shards))
            ckpt.factors[(layer, proj)] = (pair[0], pair[1])
    return ckpt


def save_native_rank_states(
    out_dir: str | os.PathLike,
    settings: LoRASettings,
    hf_config: Any,
    tp: int,
    rank_states: list[dict[str, torch.Tensor]],
    *,
    base_model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint from the per-rank slices a trainer holds (rank_states[i]: keys as in rank i's file)."""
    ckpt = gather_rank_states(settings, hf_config, tp, rank_states, base_model_name=base_model_name)
    return save_native(ckpt, out_dir, overwrite=overwrite)


def read_manifest(adapter_dir: str | os.PathLike | AdapterFiles) -> dict[str, Any]:
    """The validated manifest of a checkpoint directory (or of its files already read)."""
    files = AdapterFiles.of(adapter_dir)
    path = files.path(MANIFEST_NAME)
    if not files.has(MANIFEST_NAME):
        raise FileNotFoundError(f"{path} does not exist: not a megatron-bdlora adapter directory")
    m = files.json_object(MANIFEST_NAME)
    if m.get("format") != FORMAT:
        got = m.get("format")
        raise AdapterCheckpointError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{path}: format_version {m.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    required = ("base_model", "targets", "rank", "alpha", "use_rslora", "mode", "nblocks", "tp", "num_layers")
    missing = [k for k in required if k not in m]
    if missing:
        raise AdapterCheckpointError(f"{path}: missing field(s) {missing}")
    shape = m["base_model"].get("shape") if isinstance(m["base_model"], dict) else None
    if not isinstance(shape, dict) or sorted(shape) != sorted(SHAPE_FIELDS):
        raise AdapterCheckpointError(f"{path}: base_model.shape must have exactly the fields {list(SHAPE_FIELDS)}")
    if m["base_model"].get("shape_hash") != shape_hash(shape):
        raise AdapterCheckpointError(f"{path}: base_model.shape_hash does not match base_model.shape")
    if m["num_layers"] != shape["num_hidden_layers"]:
        raise AdapterCheckpointError(
            f"{path}: num_layers={m['num_layers']} but base_model.shape.num_hidden_layers="
            f"{shape['num_hidden_layers']}"
        )
    return m


def settings_from_manifest(manifest: dict[str, Any]) -> LoRASettings:
    """The LoRA settings a checkpoint was written with (nblocks explicit in block-diagonal mode)."""
    try:
        settings = LoRASettings(
            rank=int(manifest["rank"]),
            alpha=float(manifest["alpha"]),
            use_rslora=bool(manifest["use_rslora"]),
            dropout=float(manifest.get("dropout", 0.0)),
            mode=manifest["mode"],
            nblocks=manifest["nblocks"],
            targets=tuple(manifest["targets"]),
        )
    except (TypeError, ValueError) as e:
        raise AdapterCheckpointError(f"adapter manifest has invalid LoRA settings: {e}") from None
    if "scaling" in manifest and abs(float(manifest["scaling"]) - settings.scaling) > 1e-12 * abs(settings.scaling):
        raise AdapterCheckpointError(
            f"adapter manifest scaling={manifest['scaling']} disagrees with alpha={settings.alpha}, "
            f"rank={settings.rank}, use_rslora={settings.use_rslora} (scaling {settings.scaling})"
        )
    return settings


def load_native(adapter_dir: str | os.PathLike | AdapterFiles, base_config: Any = None) -> AdapterCheckpoint:
    """The whole adapter of a checkpoint directory (or of its files already read), every rank file validated; first
    refused if not for base_config."""
    files = AdapterFiles.of(adapter_dir)
    m = read_manifest(files)
    if base_config is not None:
        check_base_shape(m["base_model"]["shape"], base_config, files.path(MANIFEST_NAME))
    settings = settings_from_manifest(m)
    tp = int(m["tp"])
    states, sources = [], []
    for tp_rank in range(tp):
        name = rank_file_name(tp_rank)
        tensors, meta = files.safetensors(name)
        _check_rank_meta(meta, tp_rank, tp, files.path(name))
        states.append(tensors)
        sources.append(str(files.path(name)))
    ckpt = gather_rank_states(
        settings, m["base_model"]["shape"], tp, states, base_model_name=m["base_model"].get("name_or_path"),
        sources=sources,
    )
    if dtype_name(ckpt.dtype) != m.get("dtype", dtype_name(ckpt.dtype)):
        raise AdapterCheckpointError(
            f"{files.directory}: factors have dtype {dtype_name(ckpt.dtype)}, manifest says {m['dtype']}"
        )
    return ckpt


def _check_rank_meta(meta: dict[str, str], tp_rank: int, tp: int, path: Path) -> None:
    """A rank file written for another rank or TP degree (files swapped or copied between checkpoints)."""
    if meta.get("tp_rank", str(tp_rank)) != str(tp_rank) or meta.get("tp", str(tp)) != str(tp):
        raise AdapterCheckpointError(
            f"{path} was written for tp_rank={meta.get('tp_rank')} of tp={meta.get('tp')}, "
            f"expected tp_rank={tp_rank} of tp={tp}"
        )


def check_same_settings(saved: LoRASettings, settings: LoRASettings, tp: int, adapter_dir: str | os.PathLike) -> None:
    """Refuse an adapter whose rank, alpha, rsLoRA, mode, nblocks (None: tp in BD mode) or targets differ."""
    if settings.mode is Mode.BLOCK_DIAGONAL and settings.nblocks is None:
        settings = dataclasses.replace(settings, nblocks=tp)
    fields = ("rank", "alpha", "use_rslora", "mode", "nblocks")
    diff = {f: (getattr(saved, f), getattr(settings, f)) for f in fields}
    diff = {f: pair for f, pair in diff.items() if pair[0] != pair[1]}
    if canonical_targets(settings.targets) != canonical_targets(saved.targets):
        diff["targets"] = (list(canonical_targets(saved.targets)), list(canonical_targets(settings.targets)))
    if diff:
        raise AdapterCheckpointError(f"{adapter_dir} has other LoRA settings (adapter, model): {diff}")
