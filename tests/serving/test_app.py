"""The server end to end: a real uvicorn server on loopback, the official `openai` client, a tiny checkpoint."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

import phds
from phds.serving import AutoKPolicy

from .conftest import KS, MODEL_NAME, idle, live_server, wait_until

TOK = phds.tiny_tokenizer()


def ids(text: str) -> list[int]:
    return TOK(text).input_ids


def chat_ids(content: str) -> list[int]:
    text = TOK.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return TOK(text, add_special_tokens=False).input_ids


def test_models_lists_the_model_one_entry_per_declared_k_and_auto(client):
    cards = {card.id: card for card in client.models.list().data}
    assert list(cards) == [MODEL_NAME] + [f"{MODEL_NAME}@k{k}" for k in KS] + [f"{MODEL_NAME}@auto"]
    assert cards[MODEL_NAME].model_extra["k"] == 4  # the sidecar's default k
    assert cards[f"{MODEL_NAME}@k2"].model_extra["k"] == 2
    assert cards[MODEL_NAME].model_extra["ks"] == KS


def test_the_checkpoint_answers_differently_at_each_k(greedy):
    answers = {tuple(greedy(ids("The cat sat"), k, 12)) for k in KS}
    assert len(answers) == len(KS)  # otherwise the per-k equality tests could not tell ks apart


@pytest.mark.parametrize("k", KS)
def test_completion_at_each_k_equals_offline_greedy_generation(client, greedy, k):
    prompt = "The cat sat"
    answer = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body={"k": k, "return_token_ids": True}
    )
    expected = greedy(ids(prompt), k, 12)
    choice = answer.choices[0]
    assert answer.model_extra["k"] == k
    assert choice.model_extra["token_ids"] == expected
    assert choice.text == TOK.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected[-1] == 2 else "length")
    assert answer.usage.prompt_tokens == len(ids(prompt))
    assert answer.usage.completion_tokens == len(expected)


def test_model_name_suffix_picks_k_and_disagreeing_body_k_is_refused(client, greedy):
    answer = client.completions.create(model=f"{MODEL_NAME}@k1", prompt="Hi", max_tokens=6, temperature=0)
    assert answer.model_extra["k"] == 1
    assert answer.choices[0].text == TOK.decode(greedy(ids("Hi"), 1, 6), skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=f"{MODEL_NAME}@k1", prompt="Hi", max_tokens=6, extra_body={"k": 2})
    assert error.value.body["param"] == "k"


def test_chat_completion_applies_the_chat_template_and_equals_greedy(client, greedy):
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "2+2?"}],
        max_tokens=10,
        temperature=0,
        extra_body={"k": 2},
    )
    expected = greedy(chat_ids("2+2?"), 2, 10)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == TOK.decode(expected, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == len(chat_ids("2+2?"))
    assert answer.model_extra["k"] == 2


def test_streamed_chat_concatenates_to_the_non_streamed_answer_and_reports_usage(client, greedy):
    chunks = list(
        client.chat.completions.create(
            model=f"{MODEL_NAME}@k1",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = greedy(chat_ids("hello"), 1, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TOK.decode(expected, skip_special_tokens=True)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if expected[-1] == 2 else "length"]
    assert chunks[-1].usage.completion_tokens == len(expected)
    assert all(c.model_extra["k"] == 1 for c in chunks)


def test_streamed_completion_is_server_sent_events_ending_in_done(server, greedy):
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 8, "temperature": 0, "stream": True, "k": 4}
    with httpx.stream("POST", f"{server[0]}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == TOK.decode(
        greedy(ids("abc"), 4, 8), skip_special_tokens=True
    )


def test_stop_string_cuts_the_text_before_it(client, greedy):
    full = TOK.decode(greedy(ids("stop here"), 2, 16), skip_special_tokens=True)
    start = next(i for i in range(3, len(full) - 1) if full.find(full[i : i + 2]) == i)  # first seen at `start`
    answer = client.completions.create(
        model=MODEL_NAME,
        prompt="stop here",
        max_tokens=16,
        temperature=0,
        stop=[full[start : start + 2]],
        extra_body={"k": 2},
    )
    assert answer.choices[0].text == full[:start]
    assert answer.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(client):
    def sample(seed: int) -> str:
        answer = client.completions.create(
            model=MODEL_NAME,
            prompt="roll",
            max_tokens=12,
            temperature=1.5,
            top_p=0.95,
            seed=seed,
            extra_body={"return_token_ids": True},
        )
        return answer.choices[0].model_extra["token_ids"]

    first = sample(7)
    assert sample(7) == first
    assert len({tuple(sample(seed)) for seed in range(4)} | {tuple(first)}) > 1  # seeds do change the samples


def test_auto_k_runs_at_the_largest_k_meeting_the_latency_target(client, server):
    service = server[1]
    shared = service.auto_policy
    service.auto_policy = AutoKPolicy(ks=KS, target_ms=1000.0)
    try:
        service.auto_policy.observe(4, 5000.0)  # k=4 looks far slower than the 1000 ms target; k=2 well within it
        service.auto_policy.observe(2, 10.0)
        answer = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=3, extra_body={"k": "auto"})
        also = client.completions.create(model=f"{MODEL_NAME}@auto", prompt="x", max_tokens=3)
    finally:
        service.auto_policy = shared
    assert answer.model_extra["k"] == 2 and also.model_extra["k"] == 2
    metrics = httpx.get(server[0].removesuffix("/v1") + "/metrics").text
    assert 'phds_auto_k_chosen_total{k="2"} 2.0' in metrics


def test_auto_k_is_lowered_as_the_queue_grows(checkpoint):
    config = dict(max_batch=1, max_queue=4, max_model_len=8192, auto_target_ms=1000.0, auto_queue_step=1)
    with live_server(checkpoint, **config) as (base_url, service):
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "q"}]

        def auto_k() -> int:  # a chat stream's first chunk (the role) is sent before decoding and carries k
            stream = client.chat.completions.create(model=f"{MODEL_NAME}@auto", messages=messages, stream=True)
            k = next(iter(stream)).model_extra["k"]
            stream.close()
            return k

        assert auto_k() == 4
        held = []
        for _ in range(3):  # one request decoding in the only slot, two waiting for it
            stream = client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=8000, stream=True, extra_body={"ignore_eos": True}
            )
            next(iter(stream))
            held.append(stream)
        wait_until(lambda: service.in_flight == 3, "three requests in flight")
        assert service.queue_depth() == 2
        assert auto_k() == 1  # 4 -> 2 -> 1: one declared step per waiting request
        for stream in held:
            stream.close()
        wait_until(lambda: idle(service), "the held requests to be cancelled")


def test_health_and_metrics_report_the_model_and_per_k_series(client, server):
    client.completions.create(model=f"{MODEL_NAME}@k1", prompt="m", max_tokens=2)
    root = server[0].removesuffix("/v1")
    health = httpx.get(f"{root}/health").json()
    assert health["status"] == "ok" and health["ks"] == KS and health["default_k"] == 4
    metrics = httpx.get(f"{root}/metrics").text
    for series in (
        'phds_requests_total{endpoint="completions",finish_reason=',
        'phds_generation_tokens_total{k="1"}',
        "phds_queue_depth",
        'phds_request_latency_seconds_bucket{k="1"',
    ):
        assert series in metrics


# ------------------------------------------------------------------------------------------------------ errors


def test_undeclared_k_is_a_400_listing_the_allowed_values(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2, extra_body={"k": 3})
    assert "[1, 2, 4]" in error.value.body["message"]
    assert error.value.body["param"] == "k" and error.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    assert error.value.body["code"] == "model_not_found"


def test_prompt_longer_than_the_model_length_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL_NAME, prompt="x" * 300, max_tokens=2)
    assert error.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("field", "value"), [("n", 2), ("temperature", 5.0), ("k", 0), ("max_tokens", 0), ("experts", 2)]
)
def test_bad_fields_are_400s_naming_the_field(server, field, value):
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2, field: value}
    response = httpx.post(f"{server[0]}/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_malformed_json_is_a_400_in_openai_shape(server):
    response = httpx.post(
        f"{server[0]}/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_an_engine_failure_is_a_500_in_openai_shape_and_the_server_keeps_serving(client, server):
    engine = server[1].runner.engine

    def broken():
        raise RuntimeError("device lost")

    engine.step = broken  # the runner thread calls engine.step() on its next iteration
    try:
        with pytest.raises(openai.InternalServerError) as error:
            client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2)
    finally:
        del engine.step
    assert "device lost" in error.value.body["message"] and error.value.body["type"] == "internal_error"
    assert client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2).choices


def test_api_key_is_required_when_set(checkpoint):
    with live_server(checkpoint, api_key="sesame") as (base_url, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{base_url}/models").status_code == 401
        good = openai.OpenAI(base_url=base_url, api_key="sesame", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2).choices


def test_full_queue_is_a_503_with_retry_after_and_a_hung_up_stream_frees_its_slot(checkpoint):
    with live_server(checkpoint, max_batch=1, max_queue=0, max_model_len=8192) as (base_url, service):
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        stream = client.completions.create(
            model=MODEL_NAME, prompt="long", max_tokens=8000, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))  # the request holds the only slot now
        response = httpx.post(f"{base_url}/completions", json={"model": MODEL_NAME, "prompt": "b", "max_tokens": 2})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "queue_full"
        stream.close()  # hang up mid-stream
        wait_until(lambda: idle(service), "the hung-up stream's slot to be freed")
        assert 'finish_reason="length"' not in httpx.get(base_url.removesuffix("/v1") + "/metrics").text
        assert client.completions.create(model=MODEL_NAME, prompt="b", max_tokens=2).choices


def test_non_streaming_client_that_hangs_up_is_cancelled(checkpoint):
    with live_server(checkpoint, max_batch=2, max_model_len=8192) as (base_url, service):
        host, port = httpx.URL(base_url).host, httpx.URL(base_url).port
        body = json.dumps({"model": MODEL_NAME, "prompt": "slow", "max_tokens": 8000, "ignore_eos": True}).encode()
        with socket.create_connection((host, port)) as connection:
            connection.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: service.runner.num_running == 1, "the request to be decoding")
        # the socket is closed: the server must notice and cancel long before 8000 tokens
        wait_until(lambda: idle(service), "the abandoned request to be cancelled")
        metrics = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
        assert "phds_requests_total{" not in metrics  # it never completed
