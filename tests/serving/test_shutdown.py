"""`phds serve` as a process: SIGTERM lets in-flight requests finish (bounded by --drain-timeout-s), answers the rest
with 503 `shutting_down` (an error event on a stream), then exits."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from phds.serving.server import free_port

from .conftest import MODEL_NAME, wait_until

DRAIN_TIMEOUT_S = 6


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).json()["status"] == "ok"
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_sigterm_drains_a_short_request_answers_the_rest_with_shutting_down_at_the_bound_and_exits(
    checkpoint, tmp_path
):
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from phds.cli import main; main()",
        "serve",
        checkpoint,
        "--port",
        str(port),
        "--max-model-len",
        "32768",
        "--drain-timeout-s",
        str(DRAIN_TIMEOUT_S),
    ]
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _up(f"{base}/health") or process.poll() is not None, "the server to start", 180)
        assert process.poll() is None, log.read_text()
        with (
            httpx.Client(base_url=base, timeout=60) as short_client,
            httpx.Client(base_url=base, timeout=60) as long_client,
            httpx.Client(base_url=base, timeout=60) as plain_client,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            body = {"model": MODEL_NAME, "stream": True, "ignore_eos": True, "temperature": 0}
            short = short_client.stream("POST", "/v1/completions", json={**body, "prompt": "s", "max_tokens": 200})
            long = long_client.stream("POST", "/v1/completions", json={**body, "prompt": "l", "max_tokens": 30000})
            short_lines, long_lines = short.__enter__().iter_lines(), long.__enter__().iter_lines()
            assert next(short_lines).startswith("data: ") and next(long_lines).startswith("data: ")
            plain = pool.submit(
                plain_client.post,
                "/v1/completions",
                json={**body, "stream": False, "prompt": "p", "max_tokens": 30000},
            )
            wait_until(lambda: httpx.get(f"{base}/health").json()["in_flight"] == 3, "three requests in flight", 20)
            process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()

            received = [line for line in short_lines if line]
            assert received[-1] == "data: [DONE]", received  # the short request was allowed to finish
            last = json.loads(received[-2].removeprefix("data: "))
            assert last.get("choices", [{}])[0].get("finish_reason") == "length", last

            # the long stream is ended at the drain bound with the documented error event, then [DONE]
            cut = [line for line in long_lines if line]
            assert time.monotonic() - signalled_at >= DRAIN_TIMEOUT_S - 0.5, "ended before the drain bound"
            assert cut[-1] == "data: [DONE]", cut[-3:]
            error = json.loads(cut[-2].removeprefix("data: "))["error"]
            assert error["code"] == "shutting_down" and error["type"] == "overloaded_error", error
            # the non-streaming one gets the same error as a 503 in OpenAI's shape, not a 500 text/plain
            answer = plain.result(timeout=60)
            assert answer.status_code == 503 and answer.headers["content-type"] == "application/json", answer.text
            assert answer.json()["error"]["code"] == "shutting_down" and answer.headers["retry-after"]
            short.__exit__(None, None, None)
            long.__exit__(None, None, None)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        print(log.read_text())  # shown by pytest when the test fails
