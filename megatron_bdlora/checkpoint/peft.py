"""PEFT LoRA / BD-LoRA adapters (adapter_config.json + adapter_model.safetensors) to and from native checkpoints.

PEFT's stored factors are our stored forms (sharding.py), so export is a renaming of keys plus a config,
and import is a renaming plus `reshard.convert_factors`: a PEFT factor with its own block count is repacked
for the requested mode, exactly or not at all. Key mapping (LlamaForCausalLM under PeftModelForCausalLM):

    layers.{l}.{proj}.lora_A  <->  base_model.model.model.layers.{l}.{self_attn|mlp}.{proj}.lora_A.weight
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_bdlora.atomic import atomic_directory
from megatron_bdlora.checkpoint.adapters import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    AdapterCheckpoint,
    AdapterCheckpointError,
    AdapterFiles,
    Factors,
    base_shape,
    canonical_targets,
    check_tensors,
    load_native,
    read_base_config,
    save_native,
)
from megatron_bdlora.checkpoint.reshard import convert_factors, target_settings
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.sharding import Mode
from megatron_bdlora.targets import llama_projections

KEY_PREFIX = "base_model.model."  # PeftModel wrapping the HF model

# Fields that change what the adapter computes in ways a plain (BD-)LoRA on the seven projections cannot hold.
_REJECT_IF_SET = {
    "fan_in_fan_out": "weights stored transposed (Conv1D models)",
    "use_dora": "DoRA magnitude vectors",
    "use_qalora": "QA-LoRA pooled inputs",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "exclude_modules": "per-module exclusions",
    "layer_replication": "replicated layers",
    "target_parameters": "parameter (not module) targets",
    "trainable_token_indices": "trainable embedding rows",
    "alora_invocation_tokens": "activated LoRA",
    "megatron_config": "PEFT's own megatron layers",
    "monteclora_config": "the MonteCLoRA variant",
    "velora_config": "the VeLoRA variant",
    "arrow_config": "the Arrow router",
    "kasa_config": "the KaSA variant",
}
# Fields that only steer initialisation or bookkeeping; the stored adapter is a plain (BD-)LoRA either way.
_INERT = {
    "use_rslora", "use_bdlora", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
}
# init_lora_weights values whose adapter is relative to the initial weights as given (not a modified base)
_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal")


def peft_module_name(layer: int, proj: str, hf_config: Any) -> str:
    """PEFT's name of a projection module inside LlamaForCausalLM: model.layers.{l}.{self_attn|mlp}.{proj}."""
    return f"model.layers.{layer}.{llama_projections(hf_config)[proj].hf_module}.{proj}"


def peft_weight_key(layer: int, proj: str, factor: str, hf_config: Any) -> str:
    """Key of a factor ('A' or 'B') in adapter_model.safetensors."""
    return f"{KEY_PREFIX}{peft_module_name(layer, proj, hf_config)}.lora_{factor}.weight"


# ---------------------------------------------------------------------------------------------------- export


def peft_config(ckpt: AdapterCheckpoint, base_model_name: str | None = None) -> dict[str, Any]:
    """adapter_config.json content, built by PEFT's own LoraConfig (BdLoraConfig in block-diagonal mode)."""
    import peft  # lazy: seconds to import (it pulls in transformers), and only the exporter needs it

    s = ckpt.settings
    bd = None
    if s.mode is Mode.BLOCK_DIAGONAL:
        plans = ckpt.plans()
        bd = peft.BdLoraConfig(
            target_modules_bd_a=[p for p, plan in plans.items() if plan.block_diagonal_factor == "A"],
            target_modules_bd_b=[p for p, plan in plans.items() if plan.block_diagonal_factor == "B"],
            nblocks=s.nblocks,
            match_strict=True,
        )
    cfg = peft.LoraConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name or ckpt.base_model_name,
        inference_mode=True,
        r=s.rank,
        lora_alpha=int(s.alpha) if float(s.alpha).is_integer() else s.alpha,
        lora_dropout=s.dropout,
        use_rslora=s.use_rslora,
        target_modules=list(s.targets),
        bias="none",
        fan_in_fan_out=False,
        use_bdlora=bd,
    )
    d = cfg.to_dict()
    d["target_modules"] = list(s.targets)  # LoraConfig holds a set; keep the layer's order
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def peft_state_dict(ckpt: AdapterCheckpoint) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors content: every full stored factor under its PEFT key."""
    ckpt.validate()
    return {
        peft_weight_key(layer, proj, n, ckpt.base_shape): t.contiguous()
        for (layer, proj), ab in sorted(ckpt.factors.items())
        for n, t in zip("AB", ab)
    }


def export_peft(
    ckpt: AdapterCheckpoint, out_dir: str | os.PathLike, *, base_model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter directory (atomically) that PeftModel.from_pretrained loads."""
    config, state = peft_config(ckpt, base_model_name), peft_state_dict(ckpt)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def export_peft_directory(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Native checkpoint directory -> PEFT adapter directory."""
    return export_peft(load_native(adapter_dir), out_dir, base_model_name=base_model_name, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------- import


@dataclass
class PeftAdapter:
    """A PEFT adapter as read from disk: its LoRA settings and each factor with its own block count."""

    rank: int
    alpha: float
    use_rslora: bool
    dropout: float
    targets: tuple[str, ...]
    nblocks: int | None  # use_bdlora's block count; None for plain LoRA
    base_model_name: str | None
    factors: Factors = field(default_factory=dict)
    blocks: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)  # (A, B) packed block counts
    keys: dict[tuple[int, str], tuple[str, str]] = field(default_factory=dict)  # (A, B) PEFT keys, for errors

    def settings(self, plain_lora_mode: Mode | str = Mode.REPLICATED) -> LoRASettings:
        """Its settings as a native adapter: BD with its nblocks, or plain LoRA in plain_lora_mode."""
        return LoRASettings(
            rank=self.rank,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
            dropout=self.dropout,
            mode=Mode.BLOCK_DIAGONAL if self.nblocks else plain_lora_mode,
            nblocks=self.nblocks,
            targets=self.targets,
        )


def _read_config(files: AdapterFiles) -> tuple[dict[str, Any], Path]:
    path = files.path(PEFT_CONFIG_NAME)
    if not files.has(PEFT_CONFIG_NAME):
        raise FileNotFoundError(f"{path} does not exist: not a PEFT adapter directory")
    return files.json_object(PEFT_CONFIG_NAME), path


def _check_supported(cfg: dict[str, Any], path: Path, num_layers: int) -> None:
    """Reject, by field name, every PEFT option a native adapter cannot represent exactly."""
    def reject(name: str, why: str) -> None:
        raise AdapterCheckpointError(f"{path}: {name}={cfg[name]!r} is not supported ({why})")

    if cfg.get("peft_type") != "LORA":
        raise AdapterCheckpointError(f"{path}: peft_type={cfg.get('peft_type')!r} is not supported (LORA only)")
    for name in ("r", "lora_alpha", "target_modules"):
        if cfg.get(name) is None:
            raise AdapterCheckpointError(f"{path}: missing {name!r}")
    for name, why in _REJECT_IF_SET.items():
        if cfg.get(name):
            reject(name, why)
    for name, value in cfg.items():  # variants PEFT adds later: use_* flags and *_config sub-configs
        if name in _INERT or name in _REJECT_IF_SET or not value:
            continue
        if name.startswith("use_") or name.endswith("_config"):
            reject(name, "unknown LoRA variant")
    if cfg.get("bias", "none") != "none":
        reject("bias", "trained biases; only bias='none'")
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        reject("init_lora_weights", "this initialisation modifies the base weights; convert it to plain LoRA in PEFT")
    for name, default in (("rank_pattern", cfg["r"]), ("alpha_pattern", cfg["lora_alpha"])):
        odd = {k: v for k, v in (cfg.get(name) or {}).items() if v != default}
        if odd:
            raise AdapterCheckpointError(
                f"{path}: {name}={odd} sets per-module values other than {default}; native adapters have one "
                "rank and alpha for all modules"
            )
    layers = cfg.get("layers_to_transform")
    if layers is not None and layers != []:
        layers = {layers} if isinstance(layers, int) else set(layers)
        if layers != set(range(num_layers)):
            reject("layers_to_transform", f"adapts a subset of the {num_layers} layers; native adapters adapt all")


def _resolve_targets(cfg: dict[str, Any], path: Path, shape: dict[str, int]) -> tuple[str, ...]:
    """The projections target_modules selects (PEFT's matching rules), the same in every layer."""
    num_layers = shape["num_hidden_layers"]
    names = {(layer, p): peft_module_name(layer, p, shape) for layer in range(num_layers) for p in ALL_TARGETS}
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        matched = set(names) if tm == "all-linear" else {k for k, n in names.items() if re.fullmatch(tm, n)}
        if not matched:
            raise AdapterCheckpointError(
                f"{path}: target_modules regex {tm!r} matches no projection of this model {list(ALL_TARGETS)}"
            )
    else:
        matched = set()
        for t in tm:
            hits = {k for k, n in names.items() if n == t or n.endswith(f".{t}")}
            if not hits:
                raise AdapterCheckpointError(
                    f"{path}: target module {t!r} is not a projection of this model; supported targets: "
                    f"{list(ALL_TARGETS)}"
                )
            matched |= hits
    per_layer = [canonical_targets([p for (i, p) in matched if i == layer]) for layer in range(num_layers)]
    if any(t != per_layer[0] for t in per_layer):
        raise AdapterCheckpointError(
            f"{path}: target_modules {tm!r} adapts different projections in different layers; native adapters "
            "adapt the same projections in every layer"
        )
    return per_layer[0]


def _factor_blocks(cfg: dict[str, Any], path: Path, module: str) -> tuple[int, int]:
    """(A, B) block counts of one module under use_bdlora's substring patterns ((1, 1) for plain LoRA)."""
    bd = cfg.get("use_bdlora")
    if not bd:
        return 1, 1
    nblocks = int(bd.get("nblocks", 1))
    on_a = any(p in module for p in bd.get("target_modules_bd_a") or [])
    on_b = any(p in module for p in bd.get("target_modules_bd_b") or [])
    if on_a and on_b:
        raise AdapterCheckpointError(f"{path}: {module} matches both target_modules_bd_a and target_modules_bd_b")
    return (nblocks if on_a else 1), (nblocks if on_b else 1)


def read_peft(peft_dir: str | os.PathLike | AdapterFiles, hf_config: Any) -> PeftAdapter:
    """A PEFT LoRA / BD-LoRA adapter (a directory, or its files already read) for this base model, every key and
    shape validated."""
    files = AdapterFiles.of(peft_dir)
    cfg, cfg_path = _read_config(files)
    shape = base_shape(hf_config)
    _check_supported(cfg, cfg_path, shape["num_hidden_layers"])
    bd = cfg.get("use_bdlora")
    if bd is not None and (not isinstance(bd, dict) or int(bd.get("nblocks", 1)) < 1):
        raise AdapterCheckpointError(f"{cfg_path}: use_bdlora={bd!r} is not a valid BdLoraConfig")
    targets = _resolve_targets(cfg, cfg_path, shape)
    rank = int(cfg["r"])
    adapter = PeftAdapter(
        rank=rank,
        alpha=float(cfg["lora_alpha"]),
        use_rslora=bool(cfg.get("use_rslora", False)),
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        targets=targets,
        nblocks=int(bd["nblocks"]) if bd else None,
        base_model_name=cfg.get("base_model_name_or_path"),
    )
    if not files.has(PEFT_WEIGHTS_NAME) and files.path("adapter_model.bin").is_file():  # only to say why
        raise AdapterCheckpointError(f"{files.path('adapter_model.bin')}: only {PEFT_WEIGHTS_NAME} is supported")
    projs = llama_projections(shape)
    expected = {}
    for layer in range(shape["num_hidden_layers"]):
        for proj in targets:
            p = projs[proj]
            na, nb = _factor_blocks(cfg, cfg_path, peft_module_name(layer, proj, shape))
            key_a, key_b = (peft_weight_key(layer, proj, n, shape) for n in "AB")
            if p.d_in % na or rank % nb:
                raise AdapterCheckpointError(
                    f"{cfg_path}: {proj} (d_in={p.d_in}, r={rank}) cannot hold nblocks={max(na, nb)} blocks"
                )
            expected[key_a], expected[key_b] = (rank, p.d_in // na), (p.d_out, rank // nb)
            adapter.blocks[(layer, proj)] = (na, nb)
            adapter.keys[(layer, proj)] = (key_a, key_b)
    tensors, _ = files.safetensors(PEFT_WEIGHTS_NAME)
    check_tensors(tensors, expected, str(files.path(PEFT_WEIGHTS_NAME)),
                  hint=" (was the adapter trained on this base model?)")
    adapter.factors = {k: (tensors[ka], tensors[kb]) for k, (ka, kb) in adapter.keys.items()}
    return adapter


def import_peft(
    peft_dir: str | os.PathLike | AdapterFiles,
    hf_config: Any,
    tp: int,
    mode: Mode | str | None,
    nblocks: int | None = None,
    *,
    plain_lora_mode: Mode | str = Mode.REPLICATED,
    base_model_name: str | None = None,
) -> AdapterCheckpoint:
    """A PEFT adapter as a native adapter at this TP degree and mode, exactly (else an error saying why).

    mode None keeps the adapter's own: block-diagonal for `use_bdlora`, plain_lora_mode for a plain LoRA.
    """
    src = read_peft(peft_dir, hf_config)
    settings = target_settings(src.settings(plain_lora_mode), tp, mode, nblocks)
    name = base_model_name or src.base_model_name or _config_name(hf_config)
    dst = AdapterCheckpoint(settings, hf_config, tp, {}, name)
    return convert_factors(src.factors, src.blocks, dst, names=src.keys)


def _config_name(hf_config: Any) -> str | None:
    return hf_config.get("_name_or_path") if isinstance(hf_config, dict) else getattr(hf_config, "_name_or_path", None)


def adapter_base_model_dir(peft_dir: str | os.PathLike | AdapterFiles) -> Path:
    """The adapter's own base_model_name_or_path, when it is a local model directory: the default base config."""
    cfg, path = _read_config(AdapterFiles.of(peft_dir))
    name = cfg.get("base_model_name_or_path")
    if isinstance(name, str) and name and (Path(name) / "config.json").is_file():
        return Path(name)
    raise AdapterCheckpointError(
        f"{path}: base_model_name_or_path={name!r} is not a local model directory with a config.json, so the base "
        "model's shapes are unknown; pass --base-config with the base model's config.json or directory"
    )


def import_peft_directory(
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_config: str | os.PathLike | dict[str, Any] | None,
    tp: int,
    mode: Mode | str,
    nblocks: int | None = None,
    *,
    base_model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """PEFT adapter directory -> native checkpoint directory (written only if the whole import succeeds).

    base_config None: the adapter's base_model_name_or_path, which must then be a local model directory.
    """
    files = AdapterFiles.read(peft_dir)
    if base_config is None:
        base_config = adapter_base_model_dir(files)
    hf_config = base_config if isinstance(base_config, dict) else read_base_config(base_config)
    ckpt = import_peft(files, hf_config, tp, mode, nblocks, base_model_name=base_model_name)
    return save_native(ckpt, out_dir, overwrite=overwrite)
