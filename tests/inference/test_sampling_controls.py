"""Sampling controls (OpenAI / vLLM semantics) against transformers: greedy outputs of the serving loop with
logit_bias, min_tokens, repetition, frequency and presence penalties equal transformers + PEFT `generate` with the
matching logits processors (SequenceBias, MinNewTokensLength, RepetitionPenalty, and OpenAI's formula for
frequency / presence written here), over several prompts and adapters; min-p against MinPLogitsWarper."""

from __future__ import annotations

import random

import pytest
import torch
from serving_reference import serve_base, write_adapters
from test_logprobs_engine import LOOP, check_entry, hf_references, reference_logprobs, serve_jobs
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from megatron_bdlora.local_ranks import run_distributed

EOS = 2  # SmolLM2's <|im_end|>, the random Llama's EOS
STOP = 4321  # a stop token id of the min_tokens jobs
LIKED = 1000  # a token of every prompt, biased by some jobs (a repetition penalty over the prompt must push it down)
CONTROLS = {  # name -> GenerationParams fields (greedy unless said)
    "repeat_less": dict(repetition_penalty=2.5, logit_bias=((LIKED, 1.0),)),  # LIKED is in every prompt
    "repeat_more": dict(repetition_penalty=0.5),
    "frequency_presence": dict(frequency_penalty=1.5, presence_penalty=0.7, logit_bias=((LIKED, 3.0),)),
    "negative_frequency": dict(frequency_penalty=-2.0, presence_penalty=-1.0),
    "bias": dict(logit_bias=((1000, 9.0), (2000, 8.5), (3000, -100.0)), logprobs=2),
    "min_tokens": dict(min_tokens=3, logit_bias=((EOS, 100.0), (STOP, 50.0)), stop_token_ids=(STOP,)),
    "all": dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, logit_bias=((1500, 6.0),),
                min_tokens=2),
    "min_p_sampled": dict(temperature=1.0, seed=7, min_p=1.0, repetition_penalty=1.8),  # only the argmax survives
}


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency / presence penalties over the generated tokens: logit - count * f - (count > 0) * p."""

    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0) * self.presence


def processors(fields: dict, prompt_length: int) -> LogitsProcessorList:
    """transformers' processors for these controls, in vLLM's order: bias and min_tokens, then the penalties."""
    out = LogitsProcessorList()
    if fields.get("logit_bias"):
        out.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in fields["logit_bias"]]))
    if fields.get("min_tokens"):
        stops = [EOS, *fields.get("stop_token_ids", ())]
        out.append(MinNewTokensLengthLogitsProcessor(prompt_length, fields["min_tokens"], stops))
    if fields.get("repetition_penalty", 1.0) != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(fields["repetition_penalty"]))
    if fields.get("frequency_penalty") or fields.get("presence_penalty"):
        out.append(OpenAIPenalties(prompt_length, fields.get("frequency_penalty", 0.0),
                                   fields.get("presence_penalty", 0.0)))
    return out


def transformers_greedy(model, prompt: list[int], fields: dict, max_tokens: int) -> list[int]:
    """transformers' greedy tokens with the controls' processors; EOS and the stop ids end it (and are cut)."""
    stops = [EOS, *fields.get("stop_token_ids", ())]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=stops, pad_token_id=EOS)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                             generation_config=config, logits_processor=processors(fields, len(prompt)))
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


@pytest.mark.slow
@pytest.mark.multi_rank
def test_greedy_outputs_with_penalties_bias_and_min_tokens_equal_transformers_processors(tmp_path):
    from megatron_bdlora.inference.requests import GenerationParams

    meg = serve_base(1)
    names = ["a0", "a1", "a3"]
    adapters = write_adapters(tmp_path, meg, 1, names)
    rng = random.Random(5)
    jobs, expected = [], []
    for i, (label, fields) in enumerate(CONTROLS.items()):
        for adapter in (names[i % 3], None):
            prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(4, 20))]
            prompt.insert(rng.randrange(len(prompt)), LIKED)
            params = GenerationParams(**({"max_tokens": 8, "temperature": 0.0} | fields))
            jobs.append((len(jobs) // 4, prompt, adapter, params))
            expected.append(label)
    events, _ = run_distributed(serve_jobs, 1, meg, adapters, jobs, LOOP)[0]
    refs = hf_references(meg, adapters, 1, names)
    changed = set()
    for i, ((_, prompt, adapter, params), label) in enumerate(zip(jobs, expected)):
        got = [t for e in events[i] for t in e.token_ids]
        fields = CONTROLS[label]
        want = transformers_greedy(refs[adapter], prompt, fields, params.max_tokens)
        assert got == want, f"{label} ({adapter}): {got} vs transformers' {want}"
        assert events[i][-1].finish_reason == ("stop" if len(want) < params.max_tokens else "length")
        baseline = {} if label == "bias" else {k: v for k, v in fields.items() if k == "logit_bias"}
        changed |= {label} if want != transformers_greedy(refs[adapter], prompt, baseline, params.max_tokens) else set()
        if params.logprobs is not None:  # raw: the model's log_softmax, not the biased one
            rows = reference_logprobs(refs[adapter], prompt, got)[len(prompt) - 1 :]
            for j, entry in enumerate(lp for e in events[i] for lp in e.logprobs):
                check_entry(f"{label} token {j}", entry, rows[j], got[j], params.logprobs)
    assert changed == set(CONTROLS), f"controls that changed no output (too weak to test): {set(CONTROLS) - changed}"
    # (the baseline of a control is greedy with its logit_bias alone, so that a bias cannot hide a penalty's effect)
    assert [len([t for e in events[i] for t in e.token_ids]) for i, label in enumerate(expected)
            if label == "min_tokens"] == [3, 3], "min_tokens: EOS (biased +100) right after the third token"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_after_temperature_keeps_the_tokens_and_distribution_of_transformers_min_p_warper(temperature, min_p):
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.sampling import filtered_logits

    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    kept = []
    for row in logits:
        got = filtered_logits(row, GenerationParams(temperature=temperature, min_p=min_p))
        scores = row.double().unsqueeze(0)
        want = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, scores))[0]
        assert torch.equal(torch.isinf(got), torch.isinf(want)), "not the same tokens kept"
        torch.testing.assert_close(got.softmax(-1), want.softmax(-1), atol=1e-12, rtol=0)
        kept.append(int(torch.isfinite(got).sum()))
    assert any(1 < k < 300 for k in kept), f"min_p kept all tokens or one on every row: {kept}"


@pytest.mark.slow
@pytest.mark.multi_rank
def test_stop_string_kept_or_cut_and_special_tokens_shown_or_skipped_in_the_text():
    from transformers import AutoTokenizer

    from megatron_bdlora.inference.requests import GenerationParams

    meg = serve_base(1)
    tok = AutoTokenizer.from_pretrained(meg)
    base = hf_references(meg, {}, 1, [])[None]
    prompt = [5000 + 7 * i for i in range(12)]
    tokens = transformers_greedy(base, prompt, {}, 8)
    text = tok.decode(tokens)
    stop = text[len(tok.decode(tokens[:3])) :][:3]  # inside the 4th token's text or after it
    greedy = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    special = dict(greedy, max_tokens=2, logit_bias=((1, 100.0),))  # <|im_start|>, a special token
    jobs = [(0, prompt, None, GenerationParams(stop=(stop,), include_stop_str_in_output=keep, **greedy))
            for keep in (False, True)]
    jobs += [(0, prompt, None, GenerationParams(skip_special_tokens=skip, **special)) for skip in (True, False)]
    events, _ = run_distributed(serve_jobs, 1, meg, {}, jobs, LOOP)[0]
    texts = ["".join(e.text for e in events[i]) for i in range(len(jobs))]
    at = text.index(stop)
    assert texts[:2] == [text[:at], text[: at + len(stop)]], (texts, text, stop)
    assert [events[i][-1].finish_reason for i in (0, 1)] == ["stop", "stop"]
    assert texts[2:] == ["", "<|im_start|><|im_start|>"], texts


@pytest.mark.parametrize("fields, param", [
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(min_tokens=17), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_p=1.5), "min_p"), (dict(logit_bias=((5, 100.5),)), "logit_bias"),
    (dict(logit_bias=((50, 1.0),)), "logit_bias"), (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=0, prompt_logprobs=1, min_tokens=1), "min_tokens"),
])
def test_out_of_range_controls_are_refused_naming_the_field(fields, param):
    from megatron_bdlora.inference.requests import GenerationParams, ParamError

    with pytest.raises(ParamError) as err:
        GenerationParams(**fields).check(3, 64, vocab_size=50)
    assert err.value.param == param and param in str(err.value)


def test_max_tokens_zero_is_allowed_to_score_a_prompt_and_the_limits_are_inclusive():
    from megatron_bdlora.inference.requests import GenerationParams, ParamError

    GenerationParams(max_tokens=0, prompt_logprobs=0).check(63, 64)  # the engine still computes one token
    with pytest.raises(ParamError, match="max_model_len"):
        GenerationParams(max_tokens=0, prompt_logprobs=0).check(64, 64)
    GenerationParams(logprobs=20, prompt_logprobs=20, presence_penalty=-2.0, frequency_penalty=2.0, min_p=1.0,
                     repetition_penalty=7.0, min_tokens=16, logit_bias=((49, -100.0), (0, 100.0))).check(3, 64, 50)
