"""Serving at a per-layer allocation (`phds serve --allocation alloc.json`): every request runs at the allocation's
ks, a request naming a k is refused with one 400, and the engine never puts two per-layer ks in one forward."""

from __future__ import annotations

import asyncio

import pytest
import torch

import phds
from phds.allocation import Allocation, save_allocation
from phds.engine import Engine, SamplingParams
from phds.serving import ServeConfig, Service
from phds.serving.errors import APIError
from phds.serving.protocol import CompletionRequest

from .conftest import MODEL_NAME

ALLOCATION = {0: 1, 1: 4}
TOK = phds.tiny_tokenizer()


@pytest.fixture(scope="module")
def allocation_file(tmp_path_factory) -> str:
    allocation = Allocation(ks=ALLOCATION, budget=2.5, mean_k=2.5, loss_start=4.0, loss_end=4.1)
    return str(save_allocation(allocation, tmp_path_factory.mktemp("allocation") / "alloc.json"))


@pytest.fixture(scope="module")
def service(checkpoint, allocation_file):
    service = Service.from_config(ServeConfig(model=checkpoint, allocation=allocation_file))
    service.runner.start()
    yield service
    service.runner.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' greedy `generate` at any k (an int or a per-layer dict), on a separately loaded copy."""
    model, _ = phds.load(checkpoint, device="cpu")

    def run(prompt_ids: list[int], k, max_new_tokens: int) -> list[int]:
        with torch.no_grad(), phds.sparsity(model, k):
            out = model.generate(
                torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
            )
        return out[0, len(prompt_ids) :].tolist()

    return run


def _complete(service: Service, request: CompletionRequest):
    async def run():
        job = service.prepare_completion(request)
        return job, await service.complete(job)

    return asyncio.run(run())


def test_a_request_naming_no_k_runs_at_the_allocation(service, reference):
    prompt_ids = TOK("ab").input_ids
    expected = reference(prompt_ids, ALLOCATION, 8)
    # The allocation answers differently from either of its ks in every layer, so the equality below means something.
    assert expected != reference(prompt_ids, 1, 8) and expected != reference(prompt_ids, 4, 8)
    request = CompletionRequest(model=MODEL_NAME, prompt=prompt_ids, max_tokens=8, temperature=0, ignore_eos=True)
    job, outcome = _complete(service, request)
    assert outcome.token_ids == expected
    assert job.k == 4 and job.layer_ks == ALLOCATION  # the response reports the largest per-layer k


@pytest.mark.parametrize(
    "fields",
    [
        {"k": 2},
        {"k": 4},
        {"k": "auto"},
        {"model": f"{MODEL_NAME}@k2"},
        {"model": f"{MODEL_NAME}@auto"},
    ],
)
def test_a_request_naming_a_k_is_one_400(service, fields):
    request = CompletionRequest(**{"model": MODEL_NAME, "prompt": "ab", "max_tokens": 2, **fields})
    with pytest.raises(APIError) as error:
        service.prepare_completion(request)
    assert (error.value.status, error.value.code, error.value.param) == (400, "k_fixed", "k")
    assert "per-layer allocation {0: 1, 1: 4}" in error.value.message and "\n" not in error.value.message


def test_models_and_health_show_the_one_operating_point(service):
    assert [(card.id, card.k) for card in service.models().data] == [(MODEL_NAME, 4)]
    health = service.health()
    assert health["allocation"] == {"0": 1, "1": 4} and health["ks"] == [4]


def test_allocation_excludes_the_per_request_k_options(checkpoint, allocation_file):
    for option in ({"k_set": [1, 2]}, {"default_k": 2}, {"auto_target_ms": 50.0}):
        with pytest.raises(ValueError, match=f"drop `{next(iter(option))}`"):
            ServeConfig(model=checkpoint, allocation=allocation_file, **option)


def test_a_bad_allocation_is_refused_before_serving(checkpoint, tmp_path):
    bad = tmp_path / "alloc.json"
    bad.write_text('{"ks": {"0": 1}}')
    with pytest.raises(ValueError, match=f"{bad} is not a phds allocation file.*phds allocate"):
        ServeConfig(model=checkpoint, allocation=str(bad))
    with pytest.raises(ValueError, match=r"names layers \[0\] but the model's MoE layers are \[0, 1\]"):
        Service.from_config(ServeConfig(model=checkpoint, allocation={0: 1}))
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        Service.from_config(ServeConfig(model=checkpoint, allocation={0: 1, 1: 99}))


def test_the_engine_runs_rows_at_different_allocations_and_ks_each_at_its_own(checkpoint, reference):
    model, _ = phds.load(checkpoint, device="cpu")
    engine = Engine(model, None, max_batch_size=4)
    prompts = [TOK("ab").input_ids, TOK("xyz").input_ids, TOK("ab").input_ids, TOK("q").input_ids]
    ks = [ALLOCATION, 2, {0: 4, 1: 1}, ALLOCATION]
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    # Rows at another per-layer k wait for the running ones (the dial asserts one per-layer k per forward).
    assert engine.generate(prompts, ks, params) == [reference(p, k, 6) for p, k in zip(prompts, ks, strict=True)]
    assert phds.get_k(model) == 4  # the engine restores the model's own k when idle


def test_the_engine_refuses_a_per_layer_k_that_misses_a_layer(checkpoint):
    model, _ = phds.load(checkpoint, device="cpu")
    engine = Engine(model, None, max_batch_size=2)
    with pytest.raises(ValueError, match=r"must name every MoE layer \[0, 1\], got layers \[0\]"):
        engine.generate([[5, 6]], {0: 1})


def test_what_phds_allocate_writes_is_served(checkpoint, reference, tmp_path):
    from phds.allocation import allocate

    model, tokenizer = phds.load(checkpoint, device="cpu")
    result = allocate(model, 2.5, [{"text": "abcabc"}, {"text": "hello"}], tokenizer=tokenizer, progress=False)
    path = save_allocation(result, tmp_path / "alloc.json")
    served = Service.from_config(ServeConfig(model=checkpoint, allocation=str(path)))
    served.runner.start()
    try:
        prompt_ids = TOK("ab").input_ids
        request = CompletionRequest(model=MODEL_NAME, prompt=prompt_ids, max_tokens=4, temperature=0, ignore_eos=True)
        _, outcome = _complete(served, request)
    finally:
        served.runner.stop()
    assert outcome.token_ids == reference(prompt_ids, result.ks, 4)


def test_phds_serve_refuses_a_missing_allocation_file_in_one_line(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from phds.cli import app

    missing = tmp_path / "alloc.json"
    result = CliRunner().invoke(app, ["serve", checkpoint, "--allocation", str(missing)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert f"allocation file not found: {missing}" in result.output
