"""Adapter directories in the model: PEFT-made BD adapters imported at every TP dividing nblocks, and our
native adapters exported to PEFT, checked against transformers + PEFT (logits and merged weights)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft_reference import RANDOM_LLAMA, make_random_llama, peft_model, random_factors

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random Llama at TP 1/2/4, PEFT BD adapters (nblocks 2 and 4) saved by PEFT, and a native BD adapter saved at
    TP=2 with its logits in transformers + PEFT after export."""
    from peft import PeftModel

    from megatron_bdlora.checkpoint.adapters import AdapterCheckpoint, save_native
    from megatron_bdlora.checkpoint.peft import export_peft_directory

    root = tmp_path_factory.mktemp("adapters")
    hf_model, ids, mask = make_random_llama(root, (1, 2, 4))
    peft_dirs, want = {}, {}
    for nblocks in (2, 4):
        settings = LoRASettings(rank=8, alpha=16, mode="block_diagonal", nblocks=nblocks)
        ref = peft_model(copy.deepcopy(hf_model), settings, random_factors(RANDOM_LLAMA, settings, seed=nblocks))
        ref.save_pretrained(root / f"peft_nb{nblocks}")
        peft_dirs[nblocks] = root / f"peft_nb{nblocks}"
        with torch.no_grad():
            want[nblocks] = ref(input_ids=ids, attention_mask=mask).logits
    native = LoRASettings(rank=4, alpha=8, use_rslora=True, mode="block_diagonal", nblocks=2)
    ckpt = AdapterCheckpoint(native, RANDOM_LLAMA, 2, random_factors(RANDOM_LLAMA, native, seed=7), "random-llama")
    save_native(ckpt, root / "native_tp2")
    export_peft_directory(root / "native_tp2", root / "native_tp2_peft")
    with torch.no_grad():
        want["native"] = PeftModel.from_pretrained(copy.deepcopy(hf_model), root / "native_tp2_peft")(
            input_ids=ids, attention_mask=mask
        ).logits
    plain = LoRASettings(rank=8, alpha=16, mode="replicated")  # no use_bdlora: a plain PEFT LoRA
    ref = peft_model(copy.deepcopy(hf_model), plain, random_factors(RANDOM_LLAMA, plain, seed=11))
    ref.save_pretrained(root / "peft_plain")
    peft_dirs["plain"] = root / "peft_plain"
    with torch.no_grad():
        want["plain"] = ref(input_ids=ids, attention_mask=mask).logits
    return root, hf_model, ids, mask, peft_dirs, want


def adapter_worker(info, root, adapter_dirs, ids, mask, merge):
    """Logits with each adapter directory; with merge: logits after merging, and this rank's merged weights."""
    from megatron_bdlora.generate import load_model_for_generation
    from megatron_bdlora.model import forward_logits, lora_layers

    out = []
    for adapter_dir, plain_mode in adapter_dirs:
        model = load_model_for_generation(
            root / f"meg_tp{info.tp_size}", info.tp_size, info.tp_rank, adapter_dir, "float32", plain_mode
        )
        with torch.no_grad():
            result = {"logits": forward_logits(model, ids, mask)}
            if merge:
                for module in {id(m): m for m, _ in lora_layers(model).values()}.values():
                    module.merge_lora()
                result["merged_logits"] = forward_logits(model, ids, mask)
                result["state"] = {
                    k: v.clone()
                    for k, v in model.state_dict().items()
                    if not k.endswith("_extra_state") and ".lora." not in k
                }
        out.append(result)
    return out


@pytest.mark.multi_rank
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_peft_bd_adapters_import_at_every_tp_dividing_nblocks(setup, tp):
    """At TP=1 the native adapter saved at TP=2 rides along: resharded in memory, it must give PEFT's logits."""
    root, _, ids, mask, peft_dirs, want = setup
    dirs = {n: peft_dirs[n] for n in (2, 4) if n % tp == 0}
    if tp == 1:
        dirs["native"] = root / "native_tp2"
    results = run_distributed(adapter_worker, tp, root, [(d, "replicated") for d in dirs.values()], ids, mask, False)
    keep = mask.bool()
    for rank_results in results:
        for n, got in zip(dirs, rank_results):
            err = (got["logits"] - want[n])[keep].abs().max().item()
            assert err <= 1e-3, f"tp={tp} adapter {n}: max abs diff to PEFT {err}"


@pytest.mark.parametrize("tp", [1, 4])
def test_native_adapter_at_another_tp_gets_the_same_base_model_check(setup, tp):
    """Resharding in memory must not skip the check the same-TP path makes: another base shape is refused by name,
    before any slicing; a TP the adapter's blocks cannot be split over is refused naming both numbers."""
    from megatron_bdlora.checkpoint.adapters import AdapterCheckpointError
    from megatron_bdlora.generate import load_adapter_for_model

    root = setup[0]
    hf_config = json.loads((root / "hf" / "config.json").read_text())
    other = {**hf_config, "intermediate_size": hf_config["intermediate_size"] * 2}
    with pytest.raises(AdapterCheckpointError, match="another base model.*intermediate_size"):
        load_adapter_for_model(root / "native_tp2", other, tp, 0)
    if tp == 4:
        with pytest.raises(ValueError, match="nblocks=2.*tp=4"):
            load_adapter_for_model(root / "native_tp2", hf_config, tp, 0)


@pytest.mark.multi_rank
def test_native_bd_adapter_exported_to_peft_matches_logits_and_merge(setup):
    from peft import PeftModel

    from megatron_bdlora.checkpoint.hf import layouts

    root, hf_model, ids, mask, _, _ = setup
    ours = run_distributed(adapter_worker, 2, root, [(root / "native_tp2", "replicated")], ids, mask, True)
    ref = PeftModel.from_pretrained(copy.deepcopy(hf_model), root / "native_tp2_peft").eval()
    keep = mask.bool()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        base = hf_model(input_ids=ids, attention_mask=mask).logits
    assert (want - base)[keep].abs().max() > 1e-2, "adapter too small to test anything"
    for rank in ours:
        assert (rank[0]["logits"] - want)[keep].abs().max() <= 1e-3
        assert (rank[0]["merged_logits"] - want)[keep].abs().max() <= 1e-3
    merged = ref.merge_and_unload().state_dict()
    hf_config = json.loads((root / "hf" / "config.json").read_text())
    checked = 0
    for layout in layouts(hf_config, 2):
        if ".layers." not in layout.megatron or layout.split_dim is None:
            continue
        for name, tensor in zip(layout.hf, layout.merge([r[0]["state"][layout.megatron] for r in ours])):
            assert (tensor - merged[name]).abs().max() <= 1e-6, f"merged {name} differs from PEFT's merge_and_unload"
            checked += 1
    assert checked == 2 * 7, f"expected all 7 projections of both layers, compared {checked}"


@pytest.mark.multi_rank
def test_plain_peft_lora_serves_replicated_and_slora_and_is_refused_as_bd(setup):
    from megatron_bdlora.generate import load_adapter_for_model

    root, _, ids, mask, peft_dirs, want = setup
    dirs = [(peft_dirs["plain"], "replicated"), (peft_dirs["plain"], "slora")]
    keep = mask.bool()
    for rank_results in run_distributed(adapter_worker, 2, root, dirs, ids, mask, False):
        for (_, mode), got in zip(dirs, rank_results):
            err = (got["logits"] - want["plain"])[keep].abs().max().item()
            assert err <= 1e-3, f"plain LoRA as {mode}: max abs diff to PEFT {err}"
    hf_config = json.loads((root / "hf" / "config.json").read_text())
    with pytest.raises(ValueError, match="off-block magnitude"):
        load_adapter_for_model(peft_dirs["plain"], hf_config, 2, 0, plain_lora_mode="block_diagonal")
