"""Shared fixtures: a fresh store per test and real models built in the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from weightatlas.storage import Store  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", create=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A 64-32-10 MLP trained on scikit-learn's digits, saved at steps 1, 10, 60."""
    from weightatlas._demo import train_digits_mlp

    out = tmp_path_factory.mktemp("digits")
    return train_digits_mlp(str(out))

