import os
import sys

import pytest
import torch
from threadpoolctl import threadpool_limits

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub: nothing can be downloaded here

# The scripts (train.py, sample.py, evaluate.py, ...) are files at the top of the repository, not installed modules:
# tests import them from there (`import train`), ahead of any installed package of the same name.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Image-folder scan indexes go to a temporary folder, not the user's ~/.cache/fpdm (subprocesses inherit it)."""
    os.environ["FPDM_CACHE"] = str(tmp_path_factory.mktemp("fpdm-cache"))
    yield
    del os.environ["FPDM_CACHE"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test's tensors are tiny: extra torch / BLAS threads only add overhead, and on busy cores make loops many
    times slower. (Subprocesses set their own threads.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def reset_accelerate():
    """Forget accelerate's process-wide state, so that the next Accelerator in this process starts clean (each
    train.main call creates one)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


def random_model(config, seed=1, scale=0.1):
    """`models.DiT(**config)` in eval mode with every parameter drawn from scale·N(0, 1) (seeded): adaLN-Zero would
    otherwise make a fresh model's outputs exactly zero, and tests compare real outputs."""
    from models import DiT
    model = DiT(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()
