"""tools/bench_kernels.py on CPU: its correctness part (Triton in the interpreter vs the torch path, every mode and
layer kind, fp32 and fp16) passes and lands in its JSON; a kernel that drops the adapter scaling is caught."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tool_module import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_kernels")


def test_run_checks_every_mode_and_writes_json(bench, tmp_path):
    result = bench.main(["--json", str(tmp_path / "k.json"), "--budget-s", "0"])  # a GPU: no time for the sweep
    saved = json.loads((tmp_path / "k.json").read_text())
    assert saved["checks_ok"] and result["checks_ok"]
    assert {(r["mode"], r["kind"], r["dtype"]) for r in saved["checks"]} == {
        (m, k, d) for m in bench.MODES for k in ("column", "row")
        for d in ("float32", "float16") + (("bfloat16",) if torch.cuda.is_available() else ())
    }
    assert not saved.get("decode")  # timings only on a GPU, and none within a zero budget


def test_checks_catch_a_wrong_scaling(bench, monkeypatch):
    from megatron_bdlora import kernels

    real = kernels.expand_packed

    def off_by_one_percent(z, slices, *args, **kwargs):
        return real(z, [dataclasses.replace(sl, scalings=sl.scalings * 1.01) for sl in slices], *args, **kwargs)

    monkeypatch.setattr(kernels, "expand_packed", off_by_one_percent)
    rows = bench.check("cpu" if not torch.cuda.is_available() else "cuda", [torch.float32], 64)
    assert not any(r["ok"] for r in rows)
