"""Shared test setup: Triton runs under its CPU interpreter; the Scenic fixtures (the comparison
rule lives in compare.py)."""
import os

# Must be set before any module defines a @triton.jit kernel: Triton reads it at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def fixtures_dir() -> Path | None:
    env = os.environ.get("MBT_FAST_SCENIC_FIXTURES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "scenic_mbt"
    return path if path.is_dir() else None


@pytest.fixture
def scenic_fixtures():
    path = fixtures_dir()
    if path is None:
        pytest.skip("Scenic fixtures not found: set MBT_FAST_SCENIC_FIXTURES or place shared/fixtures/scenic_mbt beside the repo")
    return path


@pytest.fixture
def one_torch_thread():
    """One torch CPU thread: on a small, busy CPU, two threads make tiny-model steps erratic and slow."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
