"""Shared fixtures: tiny random MoE models of every supported family, built from config with no network."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import phds
from phds.tiny import FAMILIES

torch.set_num_threads(min(2, os.cpu_count() or 1))


def sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """A tiny random model whose ks answer differently: at init the experts barely move the residual stream, so
    every k would give the same tokens; scaled up, each k (and each cut of a layer) changes the output."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                parameter.mul_(8.0)
            elif "embed_tokens" in name or "lm_head" in name:
                parameter.mul_(4.0)
    return model


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


# The families of issue 18 run the parametrised suite in the slow step only (`-m slow`, CI's second run), to keep the
# default run fast; tests/test_dial_families.py covers them in the default run.
SLOW_FAMILIES = ("llama4", "phimoe", "jetmoe", "afmoe")
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f for f in FAMILIES]


@pytest.fixture(params=FAMILY_PARAMS)
def arch(request) -> str:
    return request.param


def twin_at_k(model: torch.nn.Module, arch: str, k: int, **overrides) -> torch.nn.Module:
    """A model of the same family built with `num_experts_per_tok=k`, carrying `model`'s weights.

    transformers' PhiMoE picks 2 experts whatever k says; its twin's routers instead give the dial's stated rule
    for k (`sparsemixer_at_k`), computed here directly from the router logits."""
    twin = phds.tiny_model(arch, num_experts_per_tok=k, **overrides)
    twin.load_state_dict(model.state_dict())
    if arch == "phimoe" and k != 2:
        for module in twin.modules():
            if type(module).__name__ == "PhimoeTopKRouter":
                module.register_forward_hook(
                    lambda router, args, out: (out[0], *sparsemixer_at_k(out[0], k, router.router_jitter_noise))
                )
    return twin.eval()


def sparsemixer_at_k(logits_TE: torch.Tensor, k: int, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's eval routing at any k, token by token: slot j takes the best expert not taken yet, weighted by the
    softmax of the logits of the experts not taken yet that lie within a relative 2 * jitter of its logit."""
    weights, indices = torch.zeros(logits_TE.shape[0], k), torch.zeros(logits_TE.shape[0], k, dtype=torch.long)
    for t, row in enumerate(logits_TE.detach().double()):
        taken: list[int] = []
        for j in range(k):
            free = [e for e in range(row.numel()) if e not in taken]
            best = max(free, key=lambda e: float(row[e]))
            top = float(row[best])
            near = [e for e in free if (top - float(row[e])) / max(abs(float(row[e])), top) <= 2 * jitter]
            weights[t, j] = 1.0 / sum(math.exp(float(row[e]) - top) for e in near)
            indices[t, j] = best
            taken.append(best)
    return weights.to(logits_TE.dtype), indices


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(4, 100, (3, 9), generator=torch.Generator().manual_seed(0))
