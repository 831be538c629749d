"""Fixtures of the serving tests: a tiny checkpoint on disk, its offline greedy reference, and live servers.

The checkpoint is a tiny OLMoE whose vocabulary is exactly the tiny tokenizer's 100 ids (so every generated token
decodes to text), with experts scaled up so that each k answers differently, saved with a sidecar declaring ks [1, 2, 4]. Servers are real uvicorn servers on free loopback
ports, run from a thread, and are talked to with the official `openai` client.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest
import torch

import phds
from phds.serving import ServeConfig, Service, background_server
from phds.sidecar import Sidecar
from tests.conftest import sharpened

KS = [1, 2, 4]
MODEL_NAME = "tiny-phds"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    # sharpened, so that each k answers differently and the per-k equality tests below mean something
    model = sharpened(phds.tiny_model("olmoe", vocab_size=100, seed=3))
    out = tmp_path_factory.mktemp("serving") / MODEL_NAME
    phds.save(model, out, tokenizer=phds.tiny_tokenizer(), sidecar=Sidecar(ks=KS, k_pre=4, default_k=4))
    return str(out)


@pytest.fixture(scope="session")
def greedy(checkpoint) -> Callable[[list[int], int, int], list[int]]:
    """Offline reference: transformers' `generate(do_sample=False)` at k, on a separately loaded copy."""
    model, _ = phds.load(checkpoint, device="cpu")
    cache: dict = {}

    def run(prompt_ids: list[int], k: int, max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), k, max_new_tokens)
        if key not in cache:
            with torch.no_grad(), phds.sparsity(model, k):
                out = model.generate(
                    torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
                )
            new = out[0, len(prompt_ids) :].tolist()
            cache[key] = new[: new.index(2) + 1] if 2 in new else new  # generate pads after eos
        return cache[key]

    return run


@contextlib.contextmanager
def live_server(checkpoint: str, **overrides) -> Iterator[tuple[str, Service]]:
    config = ServeConfig(model=checkpoint, port=0, drain_timeout_s=5, **overrides)
    service = Service.from_config(config)
    with background_server(service, config) as base_url:
        yield base_url, service


@pytest.fixture(scope="session")
def server(checkpoint) -> Iterator[tuple[str, Service]]:
    """The shared server: batch of 4, room to queue 60, auto-k enabled."""
    with live_server(checkpoint, max_batch=4, max_queue=60, auto_target_ms=1000.0) as running:
        yield running


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


def idle(service: Service) -> bool:
    return service.in_flight == 0 and service.runner.num_running == 0 and service.runner.num_waiting == 0
