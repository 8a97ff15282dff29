"""Issue 24's fields against the real server (TP=1, the embedded SmolLM2 with a PEFT-made BD adapter), through the
official openai client: log-probabilities of completions and chat, streamed or not, equal transformers + PEFT's
log_softmax; echo scoring (max_tokens 0, as lm-evaluation-harness asks); a list of 5 prompts equals the 5 sent one
by one; n=4 with a seed is reproducible across runs and batch mixes, choice j being the seed + j request.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from live_server import LiveServer
from peft_reference import peft_model, random_factors

from megatron_bdlora.config import LoRASettings

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

TOL = 1e-4  # absolute, on log-probabilities (float32 both sides)
PROMPTS = ("The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at", "My favourite colour")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_bdlora.base_models import resolve_hf_base

    root = tmp_path_factory.mktemp("openai_live")
    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    settings = LoRASettings(rank=6, alpha=12, nblocks=3)
    ref = peft_model(copy.deepcopy(hf_model), settings,
                     random_factors(hf_model.config.to_dict(), settings, seed=5, scale=0.15))
    ref.save_pretrained(root / "peft_bd")
    server = LiveServer(1, ["--mode", "block_diagonal", "--adapter", f"bd={root / 'peft_bd'}", "--max-loras", "2",
                            "--max-model-len", "256", "--kv-cache-gb", "0.1"])
    try:
        yield server, ref, tok
    finally:
        assert server.stop() == 0, server.log()


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row t is the next-token distribution after ids[:t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(_log_softmax(model, out)[-1].argmax()))
    return out[len(ids):]


def test_completion_logprobs_and_echo_equal_peft_streamed_or_not(live):
    server, ref, tok = live
    ids = tok(PROMPTS[0])["input_ids"]
    want = _greedy(ref, ids, 6)
    rows = _log_softmax(ref, ids + want)
    out = server.client.completions.create(model="bd", prompt=ids, max_tokens=6, temperature=0.0, logprobs=5,
                                           echo=True)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == tok.decode(ids + want)
    assert lp.tokens == [tok.decode([t]) for t in ids + want] and lp.token_logprobs[0] is None
    for t in range(1, len(ids) + len(want)):
        token = (ids + want)[t]
        assert abs(lp.token_logprobs[t] - rows[t - 1, token].item()) <= TOL, t
        top = torch.topk(rows[t - 1], 5)
        expected = {tok.decode([token]): rows[t - 1, token].item(),
                    **{tok.decode([i]): v for v, i in zip(top.values.tolist(), top.indices.tolist())}}
        assert lp.top_logprobs[t].keys() == expected.keys(), t
        assert all(abs(lp.top_logprobs[t][k] - v) <= TOL for k, v in expected.items()), t
    chunks = list(server.client.completions.create(model="bd", prompt=ids, max_tokens=6, temperature=0.0,
                                                   logprobs=5, echo=True, stream=True))
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert streamed[0] is None and max(abs(a - b) for a, b in zip(streamed[1:], lp.token_logprobs[1:])) <= TOL


def test_echo_with_max_tokens_0_scores_a_batch_of_prompts_as_lm_eval_asks(live):
    server, ref, tok = live
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    out = server.client.completions.create(model="bd", prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                           temperature=0.0)
    assert out.usage.completion_tokens == 0
    for ids, choice in zip(prompts, sorted(out.choices, key=lambda c: c.index)):
        rows = _log_softmax(ref, ids)
        assert choice.text == tok.decode(ids) and len(choice.logprobs.token_logprobs) == len(ids)
        got = choice.logprobs.token_logprobs[1:]
        assert max(abs(g - rows[t, ids[t + 1]].item()) for t, g in enumerate(got)) <= TOL


def test_chat_logprobs_equal_peft_streamed_or_not(live):
    server, ref, tok = live
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = _greedy(ref, ids, 5)
    rows = _log_softmax(ref, ids + want)
    out = server.client.chat.completions.create(model="bd", messages=messages, max_tokens=5, temperature=0.0,
                                                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in want]
    for i, (c, token) in enumerate(zip(content, want)):
        row = rows[len(ids) + i - 1]
        assert abs(c.logprob - row[token].item()) <= TOL
        top = torch.topk(row, 3)
        assert [t.token for t in c.top_logprobs] == [tok.decode([j]) for j in top.indices.tolist()]
        assert max(abs(t.logprob - v) for t, v in zip(c.top_logprobs, top.values.tolist())) <= TOL
    chunks = server.client.chat.completions.create(model="bd", messages=messages, max_tokens=5, temperature=0.0,
                                                   logprobs=True, top_logprobs=3, stream=True,
                                                   extra_body={"ignore_eos": True})
    streamed = [x for c in chunks for choice in c.choices if choice.logprobs for x in choice.logprobs.content]
    assert [x.token for x in streamed] == [c.token for c in content]
    assert max(abs(x.logprob - c.logprob) for x, c in zip(streamed, content)) <= TOL


def test_five_prompts_in_one_request_equal_the_five_sent_one_by_one(live):
    server, _, tok = live
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    kwargs = dict(model="bd", max_tokens=8, temperature=0.8, seed=11, logprobs=2, extra_body={"ignore_eos": True})
    together = sorted(server.client.completions.create(prompt=prompts, **kwargs).choices, key=lambda c: c.index)
    alone = [server.client.completions.create(prompt=p, **kwargs).choices[0] for p in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    for a, b in zip(together, alone):
        assert max(abs(x - y) for x, y in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs)) <= TOL


def test_n_4_with_a_seed_is_reproducible_across_runs_and_batch_mixes(live):
    server, _, tok = live
    ids = tok(PROMPTS[1])["input_ids"]
    kwargs = dict(max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    first = [c.text for c in server.client.completions.create(model="bd", prompt=ids, n=4, seed=3, **kwargs).choices]
    assert len(set(first)) > 1, "four identical samples: the choices did not get their own seeds"
    others = [(m, p) for m in ("bd", server.client.models.list().data[0].id) for p in PROMPTS[2:]]
    with ThreadPoolExecutor(len(others) + 1) as pool:  # the same request again, in a batch with six others
        mixed = pool.submit(server.client.completions.create, model="bd", prompt=ids, n=4, seed=3, **kwargs)
        for model, prompt in others:
            pool.submit(server.client.completions.create, model=model, prompt=prompt, seed=9, **kwargs)
        assert [c.text for c in mixed.result().choices] == first
    one_by_one = [server.client.completions.create(model="bd", prompt=ids, seed=3 + j, **kwargs).choices[0].text
                  for j in range(4)]
    assert one_by_one == first  # choice j is the request with seed + j (vLLM V1's rule)
