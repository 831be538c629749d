"""The engine thread: commands reach the engine between steps, events reach asyncio, failures end every stream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from phds.serving.runner import EngineRunner


@dataclass
class _Event:
    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None


@dataclass
class _Request:
    request_id: str
    k: int
    tokens: int


class _FakeEngine:
    """Emits token k, k+1, ... for each request; fails its step when `fail` is set."""

    def __init__(self) -> None:
        self.running: dict[str, list] = {}
        self.cancelled: list[str] = []
        self.fail = False

    def add(self, request):
        self.running[request.request_id] = [request, 0]

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.running.pop(request_id, None)

    def has_work(self):
        return bool(self.running)

    def num_running(self):
        return len(self.running)

    def num_waiting(self):
        return 0

    def step(self):
        if self.fail:
            raise RuntimeError("device lost")
        events = []
        for request_id, entry in list(self.running.items()):
            request, done = entry
            entry[1] += 1
            finished = entry[1] == request.tokens
            events.append(_Event(request_id, request.k + done, finished, "length" if finished else None))
            if finished:
                del self.running[request_id]
        return events


async def drain(events: asyncio.Queue) -> list:
    out = []
    while not out or not out[-1].finished:
        out.append(await asyncio.wait_for(events.get(), 30))
    return out


def test_each_request_gets_exactly_its_own_events_and_mixed_k_steps_are_counted():
    engine = _FakeEngine()
    runner = EngineRunner(engine)
    runner.start()

    async def main():
        a = runner.submit(_Request("a", k=1, tokens=3))
        b = runner.submit(_Request("b", k=4, tokens=2))
        return await drain(a), await drain(b)

    try:
        a, b = asyncio.run(main())
    finally:
        runner.stop()
    assert [e.token_id for e in a] == [1, 2, 3] and a[-1].finish_reason == "length"
    assert [e.token_id for e in b] == [4, 5]
    assert runner.mixed_k_steps >= 1


def test_a_failing_engine_step_ends_every_stream_with_an_error_and_the_thread_survives():
    engine = _FakeEngine()
    runner = EngineRunner(engine)
    runner.start()

    async def main():
        engine.fail = True
        events = runner.submit(_Request("a", k=2, tokens=100))
        failed = await drain(events)
        engine.fail = False
        after = await drain(runner.submit(_Request("b", k=2, tokens=1)))
        return failed, after

    try:
        failed, after = asyncio.run(main())
    finally:
        runner.stop()
    assert failed[-1].finish_reason.startswith("error") and "device lost" in failed[-1].finish_reason
    assert "a" in engine.cancelled
    assert after[-1].finish_reason == "length"


def test_stop_cancels_what_is_running_and_ends_its_stream():
    engine = _FakeEngine()
    runner = EngineRunner(engine)
    engine.step = lambda: []  # a request that never progresses
    runner.start()

    async def main():
        events = runner.submit(_Request("a", k=2, tokens=100))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, runner.stop)
        return await drain(events)

    events = asyncio.run(main())
    assert events[-1].finish_reason == "cancelled"
    assert engine.cancelled == ["a"] and not runner.alive
