"""Shared fixtures: tiny random MoE models of every supported family, built from config with no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import phds
from phds.tiny import FAMILIES

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data_dir() -> Path | None:
    """`$PHDS_DATA`, else `../shared/data` beside the checkout; None when absent."""
    candidates = [os.environ.get("PHDS_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data not found: set PHDS_DATA or place it at ../shared/data")
    return path


@pytest.fixture(params=FAMILIES)
def arch(request) -> str:
    return request.param


def twin_at_k(model: torch.nn.Module, arch: str, k: int, **overrides) -> torch.nn.Module:
    """A model of the same family built with `num_experts_per_tok=k`, carrying `model`'s weights."""
    twin = phds.tiny_model(arch, num_experts_per_tok=k, **overrides)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(4, 100, (3, 9), generator=torch.Generator().manual_seed(0))
