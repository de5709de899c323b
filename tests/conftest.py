"""Test configuration: Triton runs in its interpreter when no GPU is present (TRITON_INTERPRET=1
must be set before triton is imported), and helpers shared by the test modules."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # Tests choose backends explicitly; a developer's MTBKD_BACKEND must not leak into them.
    monkeypatch.delenv("MTBKD_BACKEND", raising=False)


@pytest.fixture
def device() -> str:
    return DEVICE
