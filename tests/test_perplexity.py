"""The demo's held-out perplexity table (megatron_bdlora.perplexity) and mixed batch (megatron_bdlora.mixed_batch)
on a small random Llama with SmolLM2's tokenizer, against independent references: transformers (+ PEFT with the
same factors) on text packed here from the documented rule, and each request decoded alone with its adapter
merged. TP=1 in this process, to stay cheap; the demo itself runs both at TP=3."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from peft_reference import peft_model, random_factors
from serving_reference import SERVE_LLAMA, adapter_settings, merged_references, serve_base, write_adapters

from megatron_bdlora.base_models import resolve_hf_base
from megatron_bdlora.perplexity import BASE, PerplexitySpec, format_table, own_corpus_failures
from megatron_bdlora.training.config import load_config

TP = 1
ADAPTERS = ["a2", "a0"]  # BD with 2 blocks, and 1 block; write_adapters seeds them 100, 101
SEQ, MICRO, BATCHES = 16, 2, 3  # 6 windows of 16 targets per corpus
WORDS = "the king and queen of night sing light bright morrow fair cousin lady what news from hell heaven fruit".split()


def _write_corpus(path: Path, seed: int) -> Path:
    """Three form-feed separated documents of seeded words (the `text` format)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 40))) for _ in range(3)]
    path.write_text("\n\f\n".join(docs) + "\n")
    return path


def _worker(info, spec: PerplexitySpec, adapters: dict[str, str], requests: list):
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig
    from megatron_bdlora.mixed_batch import generate_mixed_batch
    from megatron_bdlora.perplexity import perplexity_worker

    table = perplexity_worker(info, spec, progress=False)
    config = ServingConfig(megatron_dir=spec.megatron_dir, adapters=adapters, max_loras=len(adapters), max_lora_rank=16,
                           max_model_len=64, max_num_seqs=len(requests), kv_cache_gb=0.01, block_size=16)
    params = GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    completions, widest = generate_mixed_batch(info, config, [(p, a) for p, a, _ in requests], params, progress=False)
    refs = merged_references(spec.megatron_dir, info.tp_size, info.tp_rank, adapters, "block_diagonal", requests)
    return table, [c.token_ids for c in completions], widest, [tokens for tokens, _ in refs]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tp1):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("perplexity")
    meg = serve_base(TP)
    adapters = write_adapters(root / "adapters", meg, TP, ADAPTERS)
    corpora = {name: str(_write_corpus(root / f"{name}.txt", seed)) for seed, name in enumerate(("one", "two"))}
    cfg = load_config(Path(__file__).parents[1] / "configs" / "smollm2-135m-bdlora-tp3.yaml", [
        f"data.seq_length={SEQ}", f"parallel.micro_batch_size={MICRO}", f"logging.eval_batches={BATCHES}"])
    spec = PerplexitySpec(meg, {"bd": adapters["a2"]}, corpora, cfg)
    tok = AutoTokenizer.from_pretrained(meg)
    requests = [
        (tok(p)["input_ids"], a, 4) for p in ("the king and", "fair cousin what news") for a in (None, *ADAPTERS)
    ]
    table, tokens, widest, refs = _worker(tp1, spec, adapters, requests)
    return dict(meg=meg, spec=spec, table=table, tokens=tokens, widest=widest, refs=refs, requests=requests)


def _reference_perplexity(model: torch.nn.Module, tokenizer, path: str) -> float:
    """exp(mean token NLL) over the first BATCHES * MICRO windows: documents joined with EOS, windows of SEQ + 1
    tokens overlapping by one (data.py's packing rule, re-derived here)."""
    docs = [d.strip("\n") for d in Path(path).read_text().split("\f") if d.strip()]
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    windows = torch.tensor([stream[i * SEQ : i * SEQ + SEQ + 1] for i in range(BATCHES * MICRO)])  # [n, SEQ + 1]
    assert windows.shape == (BATCHES * MICRO, SEQ + 1), "the test corpus is too short for the windows scored"
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits.float()  # [n, SEQ, vocab]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    return math.exp(nll.item())


def test_perplexity_table_equals_transformers_and_peft_on_the_same_text(scored):
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec, table = scored["spec"], scored["table"]
    tokenizer = AutoTokenizer.from_pretrained(scored["meg"])
    base_dir = resolve_hf_base("smollm2-135m-instruct", random_config=SERVE_LLAMA, seed=0)
    settings = adapter_settings(TP)["a2"]
    hf_config = json.loads((base_dir / "config.json").read_text())
    models = {
        BASE: LlamaForCausalLM.from_pretrained(base_dir).eval(),
        "bd": peft_model(
            LlamaForCausalLM.from_pretrained(base_dir),
            settings,
            random_factors(hf_config, settings, seed=100, scale=0.2),
        ),
    }
    assert list(table) == [BASE, "bd"] and all(list(row) == list(spec.corpora) for row in table.values())
    for row, model in models.items():
        for column, path in spec.corpora.items():
            want = _reference_perplexity(model, tokenizer, path)
            assert table[row][column] == pytest.approx(want, rel=1e-4), (
                f"{row} on {column}: {table[row][column]} vs {want}"
            )
    assert table["bd"]["one"] != pytest.approx(table[BASE]["one"], rel=1e-3), "the adapter must change the perplexity"


def test_mixed_batch_serves_every_request_together_and_each_as_if_alone(scored):
    assert scored["widest"] == len(scored["requests"]), "all requests should share one engine step"
    assert scored["tokens"] == scored["refs"]
    assert len({tuple(t) for t in scored["tokens"][:3]}) > 1, "base and adapters should not all decode alike"


def test_own_corpus_check_passes_only_when_each_adapter_beats_every_other_model_on_its_corpus():
    good = {BASE: {"m": 200.0, "c": 80.0}, "m": {"m": 150.0, "c": 70.0}, "c": {"m": 170.0, "c": 60.0}}
    assert own_corpus_failures(good, {"m": "m", "c": "c"}) == []
    bad = {BASE: {"m": 200.0, "c": 80.0}, "m": {"m": 150.0, "c": 59.0}, "c": {"m": 170.0, "c": 60.0}}
    failures = own_corpus_failures(bad, {"m": "m", "c": "c"})
    assert len(failures) == 1 and "'c'" in failures[0] and "'m'" in failures[0]
    tie = {BASE: {"m": 150.0}, "m": {"m": 150.0}}
    assert len(own_corpus_failures(tie, {"m": "m"})) == 1, "a tie is not a win"
    with pytest.raises(KeyError, match="'x'"):
        own_corpus_failures(good, {"x": "m"})
    lines = format_table(good).splitlines()
    assert lines[0].split()[-2:] == ["m", "c"] and "150.00*" in lines[3] and "60.00*" in lines[4]
