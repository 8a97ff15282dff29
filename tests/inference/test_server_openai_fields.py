"""The OpenAI / vLLM fields of issue 24 at the HTTP front end (frontend.py, protocol.py, routes.py, http_guard.py),
against the fake engine (fake_server.py, whose log-probabilities follow `fake_logprob`): log-probabilities in the
legacy completions shape and chat's, echo, vLLM's prompt_logprobs, several prompts and n per request, the sampling
fields reaching the engine, refusals of what is not implemented, and vLLM's /tokenize, /detokenize and /version.
"""

from __future__ import annotations

import json
import threading
import time

import httpx2
import pytest
from fake_server import BASE, LIKELIEST, Served, error_json, fake_logprob, serving, still_serving

from megatron_bdlora.inference.policy import ServerPolicy
from megatron_bdlora.inference.requests import GenerationParams

KEY = "k3y"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("fields"), ServerPolicy(max_queued_requests=12))


@pytest.fixture
def fresh(served):
    served.loop.step_s = 0.002
    served.loop.submitted.clear()
    served.loop.cancelled.clear()
    yield served
    served.loop.step_s = 0.002


def _ids(s: Served, text: str) -> list[int]:
    return s.loop.tokenizer.encode(text)


def _post(s: Served, body: dict, path: str = "/v1/completions") -> dict:
    res = s.http.post(path, json={"model": BASE, **body})
    assert res.status_code == 200, res.text
    return res.json()


def _events(s: Served, body: dict, path: str = "/v1/completions") -> list[dict]:
    """The JSON payloads of a stream (its [DONE] checked and dropped)."""
    with s.http.stream("POST", path, json={"model": BASE, "stream": True, **body}) as res:
        assert res.status_code == 200
        raw = "".join(res.iter_text())
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], raw
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


# --------------------------------------------------------------------------------------------------------------
# log-probabilities: completions


def test_completion_logprobs_are_the_legacy_shape_with_the_token_and_its_top_k(fresh):
    out = _post(fresh, {"prompt": "x", "max_tokens": 3, "logprobs": 2})
    # 'T' is no top token (-6 - (87 % 4)); 'h' and 'e' are the fake model's 8th and 5th likeliest
    assert out["choices"][0]["text"] == "The"
    assert out["choices"][0]["logprobs"] == {
        "tokens": ["T", "h", "e"],
        "token_logprobs": [-9.0, -2.0, -1.25],
        "top_logprobs": [{"T": -9.0, "a": -0.25, "b": -0.5}, {"h": -2.0, "a": -0.25, "b": -0.5},
                         {"e": -1.25, "a": -0.25, "b": -0.5}],
        "text_offset": [0, 1, 2],
    }
    assert fresh.loop.submitted[-1][2].logprobs == 2 and fresh.loop.submitted[-1][2].prompt_logprobs is None
    # a token among the top k appears once: k entries, not k + 1
    out = _post(fresh, {"prompt": "x", "max_tokens": 1, "logprobs": 20, "model": "poet"})
    assert out["choices"][0]["logprobs"]["top_logprobs"][0] == {
        "O": -6.0 - (ord("O") + 3) % 4, **{chr(t - 3): -0.25 * (r + 1) for r, t in enumerate(LIKELIEST)}}
    assert "prompt_logprobs" not in out["choices"][0]


def test_echo_with_logprobs_scores_every_prompt_token_first_null_as_lm_eval_reads_it(fresh):
    prompts = [_ids(fresh, "abc"), _ids(fresh, "zq")]
    out = _post(fresh, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
                        "seed": 1234})
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for prompt, choice in zip(["abc", "zq"], out["choices"]):
        lp = choice["logprobs"]
        assert choice["text"] == prompt + "T" and lp["tokens"] == [*prompt, "T"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i, ch in enumerate(prompt[1:] + "T", start=1):
            scored = fake_logprob(ord(ch) + 3, 1)
            assert lp["token_logprobs"][i] == scored.logprob
            assert lp["top_logprobs"][i] == {ch: scored.logprob, "a": -0.25}
        assert lp["text_offset"] == list(range(len(prompt) + 1))
    params = [p for _, _, p in fresh.loop.submitted]
    assert [p.prompt_logprobs for p in params] == [1, 1] and [p.logprobs for p in params] == [1, 1]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_echo_with_max_tokens_0_only_scores_the_prompt(fresh):
    out = _post(fresh, {"prompt": "hello", "echo": True, "logprobs": 0, "max_tokens": 0})
    choice = out["choices"][0]
    assert choice["text"] == "hello" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == list("hello") and choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["top_logprobs"][1] == {"e": -1.25}
    assert out["usage"]["completion_tokens"] == 0
    assert fresh.loop.submitted[-1][2].max_tokens == 0
    out = _post(fresh, {"prompt": "hello", "echo": True, "max_tokens": 0})  # echo alone: the text, no logprobs
    assert out["choices"][0]["text"] == "hello" and out["choices"][0]["logprobs"] is None


def test_echo_without_logprobs_prepends_the_prompt_text(fresh):
    out = _post(fresh, {"prompt": _ids(fresh, "Q: "), "echo": True, "max_tokens": 5})
    assert out["choices"][0]["text"] == "Q: The c" and out["choices"][0]["logprobs"] is None
    assert fresh.loop.submitted[-1][2].prompt_logprobs is None  # no prompt scoring asked of the engine


def test_vllm_prompt_logprobs_are_token_id_maps_with_rank_and_decoded_token(fresh):
    out = _post(fresh, {"prompt": "hb", "max_tokens": 1, "prompt_logprobs": 2})
    assert out["choices"][0]["prompt_logprobs"] == [None, {
        str(ord("b") + 3): {"logprob": -0.5, "rank": 2, "decoded_token": "b"},
        str(ord("a") + 3): {"logprob": -0.25, "rank": 1, "decoded_token": "a"}}]
    out = _post(fresh, {"prompt": "hz", "max_tokens": 1, "prompt_logprobs": 1})
    assert out["choices"][0]["prompt_logprobs"][1] == {
        str(ord("z") + 3): {"logprob": -6.0 - (ord("z") + 3) % 4, "rank": None, "decoded_token": "z"},
        str(ord("a") + 3): {"logprob": -0.25, "rank": 1, "decoded_token": "a"}}
    assert out["choices"][0]["logprobs"] is None
    out = _post(fresh, {"prompt": "hz", "max_tokens": 1, "prompt_logprobs": 3, "echo": True, "logprobs": 1})
    assert len(out["choices"][0]["prompt_logprobs"][1]) == 4  # 'z' and the top 3
    assert out["choices"][0]["logprobs"]["top_logprobs"][1] == {"z": -7.0, "a": -0.25}  # echo shows logprobs' 1


def test_streamed_echo_and_logprobs_add_up_to_the_whole_answer(fresh):
    body = {"prompt": "ab", "echo": True, "logprobs": 2, "max_tokens": 9}
    whole = _post(fresh, body)["choices"][0]
    chunks = [e["choices"][0] for e in _events(fresh, body)]
    assert "".join(c["text"] for c in chunks) == whole["text"] == "abThe capit"
    assert chunks[0]["text"].startswith("ab") and len(chunks) > 2
    merged = {key: sum((c["logprobs"][key] for c in chunks), []) for key in whole["logprobs"]}
    assert merged == whole["logprobs"]


# --------------------------------------------------------------------------------------------------------------
# log-probabilities: chat


def test_chat_logprobs_through_the_openai_client_streamed_or_not(fresh):
    messages = [{"role": "user", "content": "Hi"}]
    out = fresh.client.chat.completions.create(model="poet", messages=messages, max_tokens=4, logprobs=True,
                                               top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == list("Of M") and out.choices[0].message.content == "Of M"
    assert content[0].logprob == fake_logprob(ord("O") + 3, 2).logprob and content[0].bytes == [ord("O")]
    assert [(t.token, t.logprob, t.bytes) for t in content[1].top_logprobs] == [("a", -0.25, [97]),
                                                                                ("b", -0.5, [98])]
    chunks = list(fresh.client.chat.completions.create(model="poet", messages=messages, max_tokens=4, logprobs=True,
                                                       top_logprobs=2, stream=True))
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs
                for c in choice.logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    out = fresh.client.chat.completions.create(model="poet", messages=messages, max_tokens=2, logprobs=True)
    assert [c.top_logprobs for c in out.choices[0].logprobs.content] == [[], []]  # top_logprobs 0: the token only
    out = fresh.client.chat.completions.create(model="poet", messages=messages, max_tokens=2)
    assert out.choices[0].logprobs is None and fresh.loop.submitted[-1][2].logprobs is None


def test_chat_prompt_logprobs_are_on_the_answer_as_vllm(fresh):
    out = _post(fresh, {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "prompt_logprobs": 0},
                "/v1/chat/completions")
    prompt = fresh.loop.submitted[-1][0]
    assert len(out["prompt_logprobs"]) == len(prompt) and out["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in out["prompt_logprobs"][1:])


# --------------------------------------------------------------------------------------------------------------
# several prompts, n


def test_a_list_of_five_prompts_equals_the_five_sent_one_by_one(fresh):
    prompts = ["one", "two", "three", "four", "five"]
    together = _post(fresh, {"prompt": prompts, "max_tokens": 6, "temperature": 0.7, "seed": 5, "logprobs": 1,
                             "model": "poet"})
    alone = [_post(fresh, {"prompt": p, "max_tokens": 6, "temperature": 0.7, "seed": 5, "logprobs": 1,
                           "model": "poet"})["choices"][0] for p in prompts]
    assert [c["index"] for c in together["choices"]] == [0, 1, 2, 3, 4]
    assert [{**c, "index": 0} for c in together["choices"]] == alone
    assert together["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert together["usage"]["completion_tokens"] == 5 * 6


def test_n_choices_use_seed_plus_j_and_are_indexed_prompt_times_n_plus_j(fresh):
    out = _post(fresh, {"prompt": ["p", "qq"], "n": 3, "seed": 40, "temperature": 1.0, "max_tokens": 4})
    texts = [(c["index"], c["text"]) for c in out["choices"]]
    assert texts == [(0, "[40]"), (1, "[41]"), (2, "[42]"), (3, "[40]"), (4, "[41]"), (5, "[42]")]
    assert [p.seed for _, _, p in fresh.loop.submitted] == [40, 41, 42, 40, 41, 42]
    assert [ids for ids, _, _ in fresh.loop.submitted] == [_ids(fresh, "p")] * 3 + [_ids(fresh, "qq")] * 3
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 24, "total_tokens": 27}  # each prompt once
    again = _post(fresh, {"prompt": ["p", "qq"], "n": 3, "seed": 40, "temperature": 1.0, "max_tokens": 4})
    assert again["choices"] == out["choices"]
    chat = fresh.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], n=2,
                                                seed=7, temperature=0.5, max_tokens=3)
    assert [(c.index, c.message.content) for c in chat.choices] == [(0, "[7]"), (1, "[8]")]


def test_streamed_choices_carry_their_index_and_add_up_to_the_whole_answer(fresh):
    body = {"prompt": ["a", "b"], "n": 2, "seed": 3, "temperature": 0.9, "max_tokens": 9,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    whole = _post(fresh, {k: v for k, v in body.items() if k != "stream_options"})
    events = _events(fresh, body)
    texts = {i: "".join(c["text"] for e in events for c in e["choices"] if c["index"] == i) for i in range(4)}
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert all(len(e["choices"]) == 1 for e in events[:-1]) and events[-1]["choices"] == []
    assert events[-1]["usage"] == whole["usage"]
    for e in events[:-1]:  # continuous usage: the choice's prompt and its tokens so far
        (choice,) = e["choices"]
        assert e["usage"]["prompt_tokens"] == 1 and e["usage"]["completion_tokens"] <= 9
    chunks = list(fresh.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], n=2,
                                                       seed=3, temperature=0.9, max_tokens=5, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    assert {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
            for i in (0, 1)} == {0: "[3] T", 1: "[4] T"}


def test_one_failing_choice_fails_the_answer_and_cancels_the_others(fresh):
    fresh.loop.step_s = 0.02  # the good prompts' 100 tokens take 1 s; the failing one ends on the first step
    body = {"prompt": ["ok", "FAIL", "fine"], "max_tokens": 100, "ignore_eos": True}
    res = fresh.http.post("/v1/completions", json={"model": BASE, **body})
    error_json(res, 500, None, "injected failure")
    assert sorted(fresh.loop.cancelled) == sorted(
        rid for rid, (ids, _, _) in zip(_request_ids(fresh), fresh.loop.submitted) if ids != _ids(fresh, "FAIL"))
    fresh.loop.cancelled.clear()
    events = _events(fresh, body)
    assert events[-1]["error"]["code"] == 500 and "injected failure" in events[-1]["error"]["message"]
    for _ in range(100):  # bounded: 5 s
        if len(fresh.loop.cancelled) == 2:
            break
        time.sleep(0.05)
    assert len(fresh.loop.cancelled) == 2 and fresh.loop.metrics()["running"] == 0
    still_serving(fresh)


def _request_ids(s: Served) -> list[int]:
    """The fake loop numbers requests 1, 2, ...: the ids of the requests in `submitted`."""
    last = s.loop._next_id
    return list(range(last - len(s.loop.submitted) + 1, last + 1))


def test_client_disconnect_cancels_every_choice(fresh):
    fresh.loop.step_s = 0.05
    body = {"model": BASE, "prompt": ["a", "b"], "n": 2, "max_tokens": 120, "ignore_eos": True}
    with httpx2.Client(base_url=fresh.url, timeout=0.5, trust_env=False) as http:
        with pytest.raises(httpx2.ReadTimeout):
            http.post("/v1/completions", json=body)
    for _ in range(100):  # bounded: 5 s
        if len(fresh.loop.cancelled) == 4:
            break
        time.sleep(0.05)
    assert len(fresh.loop.cancelled) == 4 and fresh.loop.metrics()["running"] == 0


def test_admission_counts_engine_requests_not_http_requests(tmp_path):
    for s in serving(tmp_path, ServerPolicy(max_queued_requests=4)):
        s.loop.step_s = 0.05
        body = {"model": BASE, "prompt": "x", "n": 3, "max_tokens": 40, "ignore_eos": True}
        first = threading.Thread(target=lambda: s.http.post("/v1/completions", json=body))
        first.start()
        time.sleep(0.3)
        error_json(s.http.post("/v1/completions", json={**body, "n": 2}), 429, None, "--max-queued-requests")
        assert s.http.post("/v1/completions", json={**body, "n": 1, "max_tokens": 2}).status_code == 200
        first.join(timeout=20)
        error_json(s.http.post("/v1/completions", json={**body, "prompt": ["a", "b"], "n": 3}), 400, "n",
                   "6 generations", "limit is 4")


# --------------------------------------------------------------------------------------------------------------
# sampling fields


def test_sampling_controls_reach_the_engine(fresh):
    fresh.client.completions.create(
        model=BASE, prompt="x", max_tokens=7, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={"5": -100, "70": 2.5}, stop=["zz"],
        extra_body={"repetition_penalty": 1.2, "min_tokens": 3, "min_p": 0.1, "include_stop_str_in_output": True,
                    "skip_special_tokens": False, "max_completion_tokens": 6})
    assert fresh.loop.submitted[-1][2] == GenerationParams(
        max_tokens=6, presence_penalty=0.5, frequency_penalty=-0.25, logit_bias=((5, -100.0), (70, 2.5)),
        stop=("zz",), repetition_penalty=1.2, min_tokens=3, min_p=0.1, include_stop_str_in_output=True,
        skip_special_tokens=False)
    out = fresh.client.completions.create(model=BASE, prompt="x", max_tokens=64, stop="France",
                                          extra_body={"include_stop_str_in_output": True})
    assert out.choices[0].text == "The capital of France"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"logit_bias": {"x": 1}}, "logit_bias", ["token ids", "'x'"]),
    ({"logit_bias": {"259": 1}}, "logit_bias", ["259"]),
    ({"logit_bias": {"5": 101}}, "logit_bias", ["[-100, 100]"]),
    ({"logprobs": 21}, "logprobs", ["[0, 20]"]),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", ["stream"]),
    ({"max_tokens": 0}, "max_tokens", ["echo"]),
    ({"n": 0}, "n", [">= 1"]),
    ({"n": 2, "best_of": 3}, "best_of", ["n=2"]),
    ({"presence_penalty": 2.5}, "presence_penalty", ["[-2, 2]"]),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", ["max_tokens=10"]),
    ({"seed": 2**63 - 1, "n": 2}, "seed", ["int64"]),  # choice 1's seed + 1 is out of range
    ({"prompt": ["a", [5]]}, "prompt", ["wrong type"]),
    ({"prompt": ["a", ""]}, "prompt", ["empty"]),
    ({"suffix": "end"}, "suffix", ["not supported"]),
    ({"use_beam_search": True}, "use_beam_search", ["not supported"]),
    ({"response_format": {"type": "json_object"}}, "response_format", ["not supported"]),
    ({"guided_json": {"type": "object"}}, "guided_json", ["not supported"]),
    ({"top_logprobs": 2}, "top_logprobs", ["unknown field"]),
    ({"max_token": 5}, "max_token", ["unknown field"]),
])
def test_completion_fields_out_of_range_or_not_implemented_are_400_naming_them(fresh, body, param, words):
    error_json(fresh.http.post("/v1/completions", json={"model": BASE, "prompt": "x", **body}), 400, param, *words)
    assert not fresh.loop.submitted


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"top_logprobs": 2}, "top_logprobs", ["logprobs': true"]),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["[0, 20]"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["not supported"]),
    ({"tool_choice": "auto"}, "tool_choice", ["not supported"]),
    ({"functions": [{"name": "f"}]}, "functions", ["not supported"]),
    ({"function_call": "auto"}, "function_call", ["not supported"]),
    ({"chat_template": "{{ x }}"}, "chat_template", ["not supported"]),
    ({"guided_regex": "a+"}, "guided_regex", ["not supported"]),
    ({"echo": True}, "echo", ["not supported"]),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages", ["messages[0].name"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}]}, "messages",
     ["only text", "cache"]),
])
def test_chat_fields_not_implemented_are_400_naming_them(fresh, body, param, words):
    res = fresh.http.post("/v1/chat/completions",
                          json={"model": BASE, "messages": [{"role": "user", "content": "x"}], **body})
    error_json(res, 400, param, *words)
    assert not fresh.loop.submitted


def test_off_values_of_unimplemented_fields_are_accepted(fresh):
    out = fresh.client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "x", "name": None}], tool_choice="none",
        response_format={"type": "text"}, max_tokens=2, extra_body={"add_generation_prompt": False})
    assert out.choices[0].message.content == "Th"
    assert fresh.loop.submitted[-1][0] == fresh.loop.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=False)


# --------------------------------------------------------------------------------------------------------------
# vLLM's helper routes


def test_tokenize_and_detokenize_as_vllm(fresh):
    assert _post(fresh, {"prompt": "hi"}, "/tokenize") == {"count": 2, "max_model_len": 128,
                                                            "tokens": _ids(fresh, "hi")}
    assert _post(fresh, {"prompt": "hi", "add_special_tokens": True}, "/tokenize")["tokens"][0] == 1
    messages = [{"role": "user", "content": "hi"}]
    for generation in (True, False):
        out = _post(fresh, {"messages": messages, "add_generation_prompt": generation}, "/tokenize")
        assert out["tokens"] == fresh.loop.tokenizer.apply_chat_template(messages, add_generation_prompt=generation)
    assert _post(fresh, {"messages": messages}, "/tokenize")["tokens"][-len("<assistant>"):] == _ids(
        fresh, "<assistant>")
    assert _post(fresh, {"tokens": _ids(fresh, "héllo")}, "/detokenize") == {"prompt": "héllo"}
    assert fresh.http.get("/version").json() == {"version": "0.1.0"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "nobody", "prompt": "x"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": []}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/tokenize", {"prompt": "x", "return_token_strs": True}, 400, "return_token_strs"),
    ("/detokenize", {"tokens": [5, 900]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_tokenizer_routes_refuse_bad_input(fresh, path, body, status, param):
    error_json(fresh.http.post(path, json=body), status, param)


def test_tokenizer_routes_need_the_key_and_version_does_not(tmp_path):
    for s in serving(tmp_path, ServerPolicy(api_key=KEY), key=KEY):
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})):
            error_json(s.http.post(path, json=body), 401, None, "API key")
            assert s.http.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert s.http.get("/version").status_code == 200
