"""tools/eval_lm_eval.py and megatron_bdlora/bench/lm_eval_check.py, in pieces (the whole run takes minutes: it is
the documented script): the local tasks load in lm-eval offline, the comparison catches each kind of disagreement,
the server's model arguments are the ones the README shows, and --help answers without loading anything heavy."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from tool_module import TOOLS

from megatron_bdlora.bench import lm_eval_check as check


def _results(loglikelihoods: list[list[float]], generations: list[str], acc: float) -> dict:
    """lm-eval's simple_evaluate answer, as much of it as the comparison reads (documents out of order)."""
    mc = [{"doc_id": i, "resps": [[(ll, False)] for ll in lls]} for i, lls in enumerate(loglikelihoods)]
    gen = [{"doc_id": i, "filtered_resps": [text]} for i, text in enumerate(generations)]
    return {"samples": {check.MC_TASK: mc[::-1], check.GEN_TASK: gen[::-1]},
            "results": {check.MC_TASK: {"acc,none": acc}}}


def test_the_local_tasks_load_in_lm_eval_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(check.write_tasks(tmp_path)))
    tasks = manager.load([check.MC_TASK, check.GEN_TASK])["tasks"]
    mc, gen = tasks[check.MC_TASK], tasks[check.GEN_TASK]
    docs = list(mc.test_docs())
    assert len(docs) == 24 and mc.OUTPUT_TYPE == "multiple_choice" and gen.OUTPUT_TYPE == "generate_until"
    assert mc.doc_to_text(docs[0]) == "The capital of France is" and mc.doc_to_choice(docs[0])[0] == "Paris"
    assert mc.doc_to_target(docs[0]) == 0 and len(list(gen.test_docs())) == 12
    assert gen.config.generation_kwargs["until"] == ["\n"]


def test_the_comparison_catches_each_kind_of_disagreement():
    hf = _results([[-1.0, -2.0], [-3.0, -0.5]], ["Rome", " 9"], 0.5)
    server = copy.deepcopy(hf)
    server["samples"][check.MC_TASK][0]["resps"][1] = [(-0.5 - 0.9e-3, False)]  # doc 1, within 1e-3
    same = check.compare(server, hf)
    assert same.ok and same.max_loglikelihood_diff == pytest.approx(0.9e-3) and same.accuracy == (0.5, 0.5)
    server["samples"][check.MC_TASK][0]["resps"][1] = [(-0.5 - 1.1e-3, False)]
    assert check.compare(server, hf).problems == (
        f"{check.MC_TASK} document 1: log-likelihoods [-3.0, -0.5011] vs [-3.0, -0.5] (differ by 1.10e-03 > 0.001)",)
    other = _results([[-1.0, -2.0], [-3.0, -0.5]], ["Rome", " 8"], 0.75)
    assert check.compare(other, hf).problems == (f"{check.GEN_TASK} document 1: generated ' 8' vs ' 9'",
                                                 f"{check.MC_TASK} accuracy 0.75 vs 0.5")


def test_model_args_point_local_completions_at_the_server_and_hf_at_peft(tmp_path):
    model, args = check.model_args("server", tmp_path / "hf", tmp_path / "peft", "http://127.0.0.1:9")
    assert model == "local-completions" and f"model={check.ADAPTER_NAME}," in args
    assert "base_url=http://127.0.0.1:9/v1/completions" in args and "tokenizer_backend=huggingface" in args
    model, args = check.model_args("hf", tmp_path / "hf", tmp_path / "peft")
    assert model == "hf" and f"peft={tmp_path / 'peft'}" in args and "dtype=float32" in args


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, str(TOOLS / "eval_lm_eval.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and all(flag in out.stdout for flag in ("--work-dir", "--adapter", "--port"))
