"""Isolation between requests: one client's bad or hostile request cannot hurt another's (issue 15, items 1-6)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import phds
from phds.engine import Engine, Request, SamplingParams
from phds.serving.errors import APIError
from phds.serving.protocol import ChatCompletionRequest, CompletionRequest

from .conftest import MODEL_NAME, idle, live_server, wait_until


def _post(base_url: str, path: str, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    return httpx.post(base_url + path, content=content, headers=headers, timeout=60)


def _metric(base_url: str, name: str, **labels) -> float:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ------------------------------------------------------------------------------------------- item 1: sampling fields


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("temperature", float("nan")),  # json.dumps writes NaN, which the JSON parser reads back
        ("top_p", float("nan")),
        ("temperature", 2.5),
        ("max_tokens", 0),
        ("stop", [""]),
    ],
)
def test_every_sampling_field_is_checked_at_the_edge(server, name, value):
    body = {"model": MODEL_NAME, "prompt": "hi", "temperature": 1.0, "max_tokens": 2, name: value}
    answer = _post(server[0], "/completions", body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == name and f"`{name}`" in error["message"], error


def test_a_seed_torch_refuses_fails_only_its_own_request_in_the_engine_step():
    # The edge refuses such a seed; the engine must still never let one request's error fail its batch neighbours.
    model = phds.tiny_model("olmoe", vocab_size=100, seed=3)
    engine = Engine(model, None, max_batch_size=4)
    greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
    expected = Engine(model, None, max_batch_size=4).generate([[1, 5, 6]], ks=2, params=greedy)[0]
    engine.add(Request(request_id="good", prompt_ids=[1, 5, 6], k=2, params=greedy))
    hostile = SamplingParams(max_new_tokens=5, temperature=1.0, seed=2**64)
    engine.add(Request(request_id="bad", prompt_ids=[1, 7], k=1, params=hostile))
    events = []
    while engine.has_work():
        events += engine.step()
    good = [e.token_id for e in events if e.request_id == "good" and e.token_id is not None]
    bad = [e for e in events if e.request_id == "bad"]
    assert good == expected
    assert len(bad) == 1 and bad[0].finished and bad[0].token_id is None
    assert bad[0].finish_reason.startswith("error: ")


def test_a_row_whose_sampling_fails_ends_alone_and_its_neighbours_keep_their_tokens_and_random_streams():
    # temperature 1e-300 passes the edge (OpenAI allows [0, 2]) but overflows logits / temperature into NaN.
    model = phds.tiny_model("olmoe", vocab_size=100, seed=3)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    seeded = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=7)
    alone = {
        "greedy": Engine(model, None, max_batch_size=4).generate([[1, 5, 6]], ks=2, params=greedy)[0],
        "seeded": Engine(model, None, max_batch_size=4).generate([[1, 8]], ks=4, params=seeded)[0],
    }
    engine = Engine(model, None, max_batch_size=4)
    engine.add(Request(request_id="greedy", prompt_ids=[1, 5, 6], k=2, params=greedy))
    engine.add(Request(request_id="seeded", prompt_ids=[1, 8], k=4, params=seeded))
    hostile = SamplingParams(max_new_tokens=6, temperature=1e-300)
    engine.add(Request(request_id="bad", prompt_ids=[1, 7], k=1, params=hostile))
    events = []
    while engine.has_work():
        events += engine.step()
    for name, expected in alone.items():
        assert [e.token_id for e in events if e.request_id == name and e.token_id is not None] == expected, name
    bad = [e for e in events if e.request_id == "bad"]
    assert len(bad) == 1 and bad[0].token_id is None and bad[0].finish_reason.startswith("error: ")


# ------------------------------------------------------------------------------------------- item 3: odd text


@pytest.mark.parametrize("suffix", ["k\u00b2", "k\u0662", "k\uff11"])  # superscript two, Arabic-Indic two, fullwidth 1
def test_a_non_ascii_digit_in_the_model_suffix_is_a_400_not_a_500(server, suffix):
    answer = _post(server[0], "/completions", {"model": f"{MODEL_NAME}@{suffix}", "prompt": "hi", "max_tokens": 1})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "model" and "malformed suffix" in error["message"]


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/completions", '{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0"),
        ("/completions", '{"model": "%s", "prompt": "a", "stop": ["\\udfff"]}', "stop.0"),
    ],
)
def test_a_lone_surrogate_anywhere_in_the_body_is_a_400_naming_the_field(server, path, raw, field):
    answer = _post(server[0], path, raw % MODEL_NAME)
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert f"`{field}" in message and "surrogate" in message and "\n" not in message, message


# ------------------------------------------------------------------------------------------- item 4: admission


@pytest.mark.slow
def test_a_simultaneous_burst_admits_exactly_the_limit_and_refuses_the_rest_with_retry_after(checkpoint):
    with live_server(checkpoint, max_batch=2, max_queue=4) as (base_url, service):
        body = {"model": MODEL_NAME, "prompt": "burst", "max_tokens": 200, "ignore_eos": True, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
                return await asyncio.gather(*[client.post("/completions", json=body) for _ in range(40)])

        answers = asyncio.run(burst())
        statuses = sorted(a.status_code for a in answers)
        assert statuses.count(200) == 6 and statuses.count(503) == 34, statuses
        refused = [a for a in answers if a.status_code == 503]
        assert all(a.headers.get("retry-after") and a.json()["error"]["code"] == "queue_full" for a in refused)
        wait_until(lambda: idle(service), "the burst to leave the server")


def test_admission_takes_the_place_at_once_and_release_gives_it_back_once(server):
    _, service = server
    wait_until(lambda: idle(service), "the shared server to be idle")
    prepared = [
        service.prepare_completion(CompletionRequest(model=MODEL_NAME, prompt="x"))
        for _ in range(service.max_batch + service.max_queue + 1)
    ]
    try:
        for job in prepared[:-1]:
            service.admit(job)  # nothing awaited in between: the check and the count are one step
        with pytest.raises(APIError) as refused:
            service.admit(prepared[-1])
        assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    finally:
        for job in prepared:
            service.release(job)
            service.release(job)  # idempotent
    assert service.in_flight == 0


# ------------------------------------------------------------------------------------------- item 6: metrics


def test_metrics_count_cancelled_requests_by_reason(server):
    base_url, service = server
    wait_until(lambda: idle(service), "the shared server to be idle")
    before = _metric(base_url, "phds_cancelled_requests_total", reason="client_disconnected")
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as client, client.stream("POST", "/completions", json=body) as s:
        assert next(s.iter_lines()).startswith("data: ")
    wait_until(lambda: idle(service), "the abandoned stream to leave the engine")
    assert _metric(base_url, "phds_cancelled_requests_total", reason="client_disconnected") == before + 1
    assert "phds_failed_requests" in httpx.get(base_url.removesuffix("/v1") + "/metrics").text


# ------------------------------------------------------------------------------------------- item 2: big bodies


def test_a_body_over_the_limit_is_a_413_in_openai_shape_whether_or_not_it_declares_its_length(checkpoint):
    with live_server(checkpoint, max_body_mb=0.01) as (base_url, service):
        big = {"model": MODEL_NAME, "prompt": "x" * 20_000, "max_tokens": 1}
        declared = _post(base_url, "/completions", big)
        chunked = httpx.post(
            base_url + "/completions",
            content=iter([json.dumps(big).encode()[i : i + 4096] for i in range(0, 20_100, 4096)]),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        for answer in (declared, chunked):
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"]["code"] == "request_too_large" and "--max-body-mb" in answer.text
        small = _post(base_url, "/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
        assert small.status_code == 200, small.text  # a body under the limit is replayed to the app intact
        assert service.in_flight == 0


def test_a_prompt_that_cannot_fit_the_context_is_refused_before_it_is_tokenised(server, monkeypatch):
    _, service = server
    calls = []
    tokenizer = service.tokenizer

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            calls.append(len(text))
            return tokenizer(text, **kwargs)

        def apply_chat_template(self, *args, **kwargs):
            calls.append("template")
            return tokenizer.apply_chat_template(*args, **kwargs)

    monkeypatch.setattr(service, "tokenizer", Counting())
    huge = "y" * (service.max_prompt_chars + 1)
    for prepare, body in (
        (service.prepare_completion, {"prompt": huge}),
        (service.prepare_chat, {"messages": [{"role": "user", "content": huge}]}),
    ):
        request_type = CompletionRequest if prepare == service.prepare_completion else ChatCompletionRequest
        with pytest.raises(APIError) as refused:
            prepare(request_type(model=MODEL_NAME, **body))
        assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
    with pytest.raises(APIError):  # a token-id prompt is measured by its length too
        service.prepare_completion(CompletionRequest(model=MODEL_NAME, prompt=[1] * service.max_model_len))
    assert calls == []


@pytest.mark.slow
def test_tokenising_a_prompt_does_not_block_other_clients(server, monkeypatch):
    base_url, service = server
    tokenizer = service.tokenizer

    class Slow:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            if "slow" in text:
                time.sleep(3.0)
            return tokenizer(text, **kwargs)

    monkeypatch.setattr(service, "tokenizer", Slow())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_post, base_url, "/completions", {"model": MODEL_NAME, "prompt": "slow", "max_tokens": 1})
        time.sleep(0.5)
        started = time.monotonic()
        assert httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 1.5, "the event loop was blocked while a prompt was tokenised"
        assert slow.result(timeout=30).status_code == 200


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_max_body_mb_must_be_positive(value):
    from phds.serving import ServeConfig

    with pytest.raises(ValueError, match="`max_body_mb` must be > 0"):
        ServeConfig(model="tiny:olmoe", max_body_mb=value)


def test_an_unexpected_failure_is_answered_in_openai_shape_without_its_text_and_a_stream_still_ends(
    server, monkeypatch
):
    from phds.serving.detok import TextStream

    base_url, service = server

    def boom(self, token_id):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(TextStream, "push", boom)
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3}
    plain = _post(base_url, "/completions", body)
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "internal_error"
    assert "secret" not in plain.text
    with httpx.stream("POST", base_url + "/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "internal_error" and "secret" not in error["message"]
    monkeypatch.undo()
    wait_until(lambda: idle(service), "the failed requests to leave the engine")
