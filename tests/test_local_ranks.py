"""megatron_bdlora.local_ranks: ranks fork from a long-lived fork server, yet each run sees the caller's state now."""

from __future__ import annotations

import os
import sys

import pytest

from megatron_bdlora.local_ranks import run_distributed

pytestmark = pytest.mark.multi_rank


def state_worker(info) -> dict:
    import torch.distributed as dist

    return dict(rank=info.rank, world=dist.get_world_size(), tp=info.tp_size, env=os.environ.get("BDLORA_PROBE"),
                cwd=os.getcwd(), path=list(sys.path))


def test_ranks_see_the_callers_environment_directory_and_path_of_each_call(tmp_path, monkeypatch):
    monkeypatch.setenv("BDLORA_PROBE", "first")
    first = run_distributed(state_worker, 2)  # (starts the fork server if no earlier test did)
    assert [(r["rank"], r["world"], r["tp"], r["env"]) for r in first] == [(0, 2, 2, "first"), (1, 2, 2, "first")]
    # changed after the server started: the next ranks must still see the caller's values, not the server's
    monkeypatch.setenv("BDLORA_PROBE", "second")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))
    second = run_distributed(state_worker, 1)[0]
    assert second["env"] == "second" and second["cwd"] == str(tmp_path)
    assert str(tmp_path / "extra") in second["path"]


def sum_worker(info, tensors: list) -> float:
    return float(sum(t.sum() for t in tensors))


def test_hundreds_of_tensor_arguments_reach_every_rank():
    """(Tensors shared by file descriptor would stop at the fork server's 256; they travel as bytes.)"""
    import torch

    tensors = [torch.full((3,), float(i)) for i in range(400)]
    assert run_distributed(sum_worker, 2, tensors) == [3.0 * sum(range(400))] * 2
