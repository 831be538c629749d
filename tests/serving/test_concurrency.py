"""Many clients at once: requests at different k share one running batch, and none is lost, mixed up or left behind."""

from __future__ import annotations

import asyncio

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

import phds

from .conftest import KS, MODEL_NAME, idle, wait_until

TOK = phds.tiny_tokenizer()


def completed_requests(base_url: str) -> float:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families["phds_requests"].samples if s.name == "phds_requests_total")


async def one(client: openai.AsyncOpenAI, i: int, prompt: str, k: int, hang_up: bool, stream: bool):
    if hang_up:  # a long stream the client abandons after its first chunk
        chunks = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=200, stream=True, extra_body={"k": k, "ignore_eos": True}
        )
        async for _ in chunks:
            break
        await chunks.close()
        return None
    if stream:
        chunks = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body={"k": k}
        )
        return "".join([chunk.choices[0].text async for chunk in chunks if chunk.choices]), None
    answer = await client.completions.create(
        model=f"{MODEL_NAME}@k{k}", prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    assert answer.model_extra["k"] == k
    return answer.choices[0].text, answer.choices[0].model_extra["token_ids"]


def test_32_concurrent_requests_at_mixed_k_match_greedy_and_cancelled_ones_free_their_slots(server, greedy):
    base_url, service = server
    wait_until(lambda: idle(service), "the shared server to be idle")
    before, mixed_before = completed_requests(base_url), service.runner.mixed_k_steps
    prompts = [f"q{i}" + "abcdefgh"[i % 8] * (1 + i % 3) for i in range(32)]
    ks = [KS[i % len(KS)] for i in range(32)]
    hang_ups = {i for i in range(32) if i % 5 == 4}

    async def run_all():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120) as client:
            jobs = [one(client, i, prompts[i], ks[i], i in hang_ups, stream=i % 2 == 0) for i in range(32)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run_all())

    for i, result in enumerate(results):
        if i in hang_ups:
            continue
        expected = greedy(TOK(prompts[i]).input_ids, ks[i], 12)
        text, token_ids = result
        assert text == TOK.decode(expected, skip_special_tokens=True), f"request {i} at k={ks[i]}"
        if token_ids is not None:
            assert token_ids == expected, f"request {i} at k={ks[i]}"
    wait_until(lambda: idle(service), "every request, cancelled ones included, to leave the engine")
    assert completed_requests(base_url) - before == 32 - len(hang_ups)
    assert service.runner.mixed_k_steps > mixed_before  # requests at different k were decoded in the same steps
