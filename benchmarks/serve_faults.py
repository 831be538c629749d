"""Fault scenarios of `phds serve` on loopback: a burst, a drain, and hostile neighbours; prints what was admitted,
refused and lost (lost should always be 0).

Each scenario starts a real uvicorn server in this process on a free loopback port and talks raw HTTP (httpx):

- burst: --burst requests sent at once to a server admitting `max_batch + max_queue` of them. Admitted must be
  exactly that limit, the rest refused with 503 `queue_full` and a `Retry-After`; lost counts anything else.
- drain: streaming and queued non-streaming requests too long to finish, then shutdown with a short drain bound.
  Each must end with the documented 503 `shutting_down` (an error event then `[DONE]` on a stream); lost counts
  cut streams, 500s and connection errors.
- hostile neighbours: well-formed greedy requests at mixed k run next to hostile ones (a seed outside int64 with
  temperature > 0, NaN temperature, `NAME@k²`, lone surrogates, a body over --max-body-mb, a prompt longer than
  the context, a client hanging up mid-stream). Every well-formed answer must equal its answer alone; every hostile
  one must be a 4xx in OpenAI's shape; lost counts well-formed requests that failed or changed, and 5xx answers.

    python benchmarks/serve_faults.py                      # tiny:olmoe
    python benchmarks/serve_faults.py --model out/olmoe-phds --ks 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import time
from collections import Counter

import httpx

from phds.cli.common import parse_ks
from phds.serving import ServeConfig, Service, background_server


def _tally(title: str, admitted: int, refused: int, lost: int, detail: Counter) -> int:
    print(f"{title:<20} admitted {admitted:>4}   refused {refused:>4}   lost {lost:>3}   {dict(detail)}")
    return lost


# ---------------------------------------------------------------------------------------------------- burst


def burst(args, ks: list[int]) -> int:
    config = ServeConfig(model=args.model, k_set=ks, port=0, max_batch=2, max_queue=4, device=args.device)
    service = Service.from_config(config)
    limit = config.max_batch + config.max_queue
    body = {"model": service.model_name, "prompt": "burst", "max_tokens": 64, "ignore_eos": True, "temperature": 0}
    with background_server(service, config) as base_url:

        async def send_all():
            async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout_s) as client:
                return await asyncio.gather(
                    *[client.post("/completions", json=body) for _ in range(args.burst)], return_exceptions=True
                )

        answers = asyncio.run(send_all())
    detail: Counter = Counter()
    admitted = refused = lost = 0
    for answer in answers:
        if isinstance(answer, Exception):
            lost += 1
            detail[type(answer).__name__] += 1
        elif answer.status_code == 200:
            admitted += 1
        elif (
            answer.status_code == 503
            and answer.headers.get("retry-after")
            and answer.json()["error"]["code"] == "queue_full"
        ):
            refused += 1
        else:
            lost += 1
            detail[f"status {answer.status_code}"] += 1
    detail["limit"] = limit
    # an admission beyond the limit is a defect too: the limit must hold exactly
    return _tally(f"burst of {args.burst}", admitted, refused, lost + max(0, admitted - limit), detail)


# ---------------------------------------------------------------------------------------------------- drain


def _stream(base_url: str, body: dict, timeout_s: float) -> str:
    """'finished', 'shutting_down' (error event then [DONE]) or what went wrong."""
    lines = []
    try:
        with httpx.stream("POST", base_url + "/completions", json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                return _plain_outcome(response.status_code, json.loads(response.read()))
            lines = [line for line in response.iter_lines() if line]
    except httpx.HTTPError as error:
        return f"cut ({type(error).__name__})"
    if not lines or lines[-1] != "data: [DONE]":
        return "no [DONE]"
    last = json.loads(lines[-2].removeprefix("data: ")) if len(lines) > 1 else {}
    if "error" in last:
        return last["error"].get("code") or "error event"
    return "finished"


def _plain(base_url: str, body: dict, timeout_s: float) -> str:
    try:
        response = httpx.post(base_url + "/completions", json=body, timeout=timeout_s)
    except httpx.HTTPError as error:
        return f"cut ({type(error).__name__})"
    try:
        payload = response.json()
    except ValueError:
        return f"status {response.status_code} {response.headers.get('content-type')}"
    return _plain_outcome(response.status_code, payload)


def _plain_outcome(status: int, payload: dict) -> str:
    if status == 200:
        return "finished"
    return (payload.get("error") or {}).get("code") or f"status {status}"


def drain(args, ks: list[int]) -> int:
    config = ServeConfig(
        model=args.model,
        k_set=ks,
        port=0,
        max_batch=2,
        max_queue=8,
        max_model_len=32768,  # room for requests that cannot finish within the drain bound
        drain_timeout_s=2.0,
        device=args.device,
    )
    service = Service.from_config(config)
    long = {"model": service.model_name, "prompt": "drain", "ignore_eos": True, "temperature": 0}
    long["max_tokens"] = service.max_model_len - 16
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with background_server(service, config) as base_url:
            futures = [pool.submit(_stream, base_url, {**long, "stream": True}, args.timeout_s) for _ in range(3)]
            futures += [pool.submit(_plain, base_url, long, args.timeout_s) for _ in range(3)]
            deadline = time.monotonic() + args.timeout_s
            while service.in_flight < len(futures) and time.monotonic() < deadline:
                time.sleep(0.02)
            started = time.monotonic()
        # leaving the block shut the server down: each request was answered before the process could go on
        outcomes = Counter(future.result() for future in futures)
    shut_s = time.monotonic() - started
    answered = outcomes["finished"] + outcomes["shutting_down"]
    outcomes["shutdown_s"] = round(shut_s, 1)
    return _tally("drain (6 in flight)", outcomes["finished"], outcomes["shutting_down"], 6 - answered, outcomes)


# ---------------------------------------------------------------------------------------------------- hostile


def hostile(args, ks: list[int]) -> int:
    config = ServeConfig(
        model=args.model, k_set=ks, port=0, max_batch=8, max_queue=64, max_body_mb=1.0, device=args.device
    )
    service = Service.from_config(config)
    name = service.model_name
    good = [
        {"model": name, "prompt": f"neighbour {i}", "max_tokens": 16, "temperature": 0, "k": ks[i % len(ks)]}
        for i in range(args.neighbours)
    ]

    def surrogate(body: dict) -> str:  # JSON text holding a lone surrogate escape where the body says SURROGATE
        return json.dumps(body).replace("SURROGATE", "\\ud800")

    bad: list[tuple[str, dict | str | bytes]] = [
        ("seed 2**64", {"model": name, "prompt": "x", "temperature": 1.0, "seed": 2**64, "max_tokens": 8}),
        ("temperature NaN", json.dumps({"model": name, "prompt": "x", "temperature": float("nan")})),
        ("NAME@k²", {"model": f"{name}@k\u00b2", "prompt": "x"}),
        ("lone surrogate", surrogate({"model": name, "prompt": "aSURROGATE", "max_tokens": 4})),
        ("chat surrogate", surrogate({"model": name, "messages": [{"role": "user", "content": "SURROGATE"}]})),
        ("20 MB body", {"model": name, "prompt": "y" * 20_000_000}),
        ("prompt > context", {"model": name, "prompt": "z " * (service.max_prompt_chars + 1)}),
    ]

    async def run() -> tuple[list, list, int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout_s) as client:

            async def post(body):
                path = "/chat/completions" if "messages" in str(body)[:200] else "/completions"
                content = body if isinstance(body, str) else json.dumps(body)
                return await client.post(path, content=content, headers={"content-type": "application/json"})

            async def hang_up():
                body = {"model": name, "prompt": "leaver", "max_tokens": 200, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        break
                return 1

            answers = await asyncio.gather(
                *[post(body) for body in good],
                *[post(body) for _, body in bad],
                *[hang_up() for _ in range(3)],
                return_exceptions=True,
            )
            return answers[: len(good)], answers[len(good) : len(good) + len(bad)], len(answers) - len(good) - len(bad)

    with background_server(service, config) as base_url:
        alone = []
        with httpx.Client(base_url=base_url, timeout=args.timeout_s) as client:
            for body in good:
                alone.append(client.post("/completions", json={**body, "return_token_ids": True}).json())
            good = [{**body, "return_token_ids": True} for body in good]
        together, refused_answers, leavers = asyncio.run(run())
    detail: Counter = Counter()
    admitted = refused = lost = 0
    for solo, answer in zip(alone, together, strict=True):
        same = (
            not isinstance(answer, Exception)
            and answer.status_code == 200
            and answer.json()["choices"][0]["token_ids"] == solo["choices"][0]["token_ids"]
        )
        admitted += same
        lost += not same
    for (label, _), answer in zip(bad, refused_answers, strict=True):
        status = "exception" if isinstance(answer, Exception) else answer.status_code
        shaped = not isinstance(answer, Exception) and 400 <= status < 500 and "error" in answer.json()
        detail[f"{label}: {status}"] += 1
        refused += shaped
        lost += not shaped
    detail["hung up"] = leavers
    return _tally(f"hostile ({len(good)} good)", admitted, refused, lost, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:olmoe")
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--neighbours", type=int, default=12)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    ks = parse_ks(args.ks, "--ks")
    print(f"model {args.model}  ks {ks}")
    lost = burst(args, ks) + drain(args, ks) + hostile(args, ks)
    print(f"\nlost in all: {lost}")
    raise SystemExit(1 if lost else 0)


if __name__ == "__main__":
    main()
