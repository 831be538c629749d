"""Drive the (not thread-safe) decode engine from one background thread and hand its events to asyncio.

The event loop never touches the engine: it posts `add`/`cancel` commands to an inbox; the engine thread applies
them between steps, runs `engine.step()` while there is work, and delivers each `TokenEvent` to the asyncio queue of
its request with `loop.call_soon_threadsafe`, so one running batch is shared by every request, whatever its k.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class Finished:
    """A finish event the runner makes itself (engine failure, shutdown); same fields as the engine's TokenEvent."""

    request_id: str
    token_id: int | None = None
    finished: bool = True
    finish_reason: str | None = "cancelled"


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    k: int | tuple[tuple[int, int], ...]  # a per-layer k as its sorted items, so that a step's ks form a set


class EngineRunner:
    """Owns the engine and the thread that steps it.

    Args:
        engine: a `phds.engine.Engine` (anything with add/cancel/step/has_work/num_running/num_waiting).
        idle_wait_s: how long the idle thread sleeps between inbox checks (it is also woken on every command).

    Example:
        >>> runner = EngineRunner(Engine(model, tok, max_batch_size=8)); runner.start()
        >>> events = runner.submit(request)   # an asyncio.Queue of TokenEvents, inside a running event loop
        >>> runner.cancel(request.request_id); runner.stop()
    """

    def __init__(self, engine, *, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._subscribers: dict[str, _Subscriber] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        # Snapshots written by the engine thread after each step, read by anyone (plain ints: atomic under the GIL).
        self.num_running = 0
        self.num_waiting = 0
        self.steps = 0
        self.mixed_k_steps = 0  # steps whose events came from requests at more than one k
        self.peak_running = 0

    # ---------------------------------------------------------------------------------------- event-loop side

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the runner is already started")
        self._thread = threading.Thread(target=self._run, name="phds-engine", daemon=True)
        self._thread.start()

    def submit(self, request) -> asyncio.Queue:
        """Queue `request` (a `phds.engine.Request`); its events arrive on the returned asyncio queue."""
        if self._stop.is_set():
            raise RuntimeError("the runner is stopped")
        events: asyncio.Queue = asyncio.Queue()
        k = tuple(sorted(request.k.items())) if isinstance(request.k, Mapping) else request.k
        self._inbox.put(("add", request, _Subscriber(asyncio.get_running_loop(), events, k)))
        self._wake.set()
        return events

    def cancel(self, request_id: str) -> None:
        """Free the request's slot at the engine's next step; no more events are delivered for it."""
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    def abort_all(self, reason: str) -> None:
        """End every waiting and running request at the engine's next step with a finish event carrying `reason`."""
        self._inbox.put(("abort", reason, None))
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel what is still running, end every waiting stream with a 'cancelled' event, join the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.1fs", timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as error:  # anything outside step(): no engine thread any more, so end every stream
            logger.exception("the engine thread failed")
            self._cancel_all(f"error: {error}")

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._apply_commands()
            if self._stop.is_set():
                self._cancel_all("cancelled")
                return
            if self.engine.has_work():
                self._step()
            else:
                self._wake.wait(self.idle_wait_s)

    def _apply_commands(self) -> None:
        while True:
            try:
                op, payload, subscriber = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    self.engine.add(payload)
                except Exception as error:  # a request the engine refuses must not stop the thread
                    logger.exception("engine.add failed for %s", payload.request_id)
                    subscriber.loop.call_soon_threadsafe(
                        subscriber.queue.put_nowait, Finished(payload.request_id, finish_reason=f"error: {error}")
                    )
                    continue
                self._subscribers[payload.request_id] = subscriber
            elif op == "cancel" and self._subscribers.pop(payload, None) is not None:
                self._engine_cancel(payload)
            elif op == "abort":
                self._cancel_all(payload)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as error:
            logger.exception("engine.step failed; failing every request in flight")
            self._cancel_all(f"error: {error}")
            return
        self.steps += 1
        ks = set()
        for event in events:
            subscriber = self._subscribers.get(event.request_id)
            if subscriber is None:
                continue  # cancelled meanwhile
            ks.add(subscriber.k)
            if event.finished:
                del self._subscribers[event.request_id]
            self._deliver(subscriber, event)
        self.mixed_k_steps += len(ks) > 1
        self.num_running = self.engine.num_running()
        self.num_waiting = self.engine.num_waiting()
        self.peak_running = max(self.peak_running, self.num_running)

    def _cancel_all(self, reason: str) -> None:
        for request_id, subscriber in list(self._subscribers.items()):
            self._engine_cancel(request_id)
            self._deliver(subscriber, Finished(request_id, finish_reason=reason))
        self._subscribers.clear()
        self.num_running = self.num_waiting = 0

    def _engine_cancel(self, request_id: str) -> None:
        try:
            self.engine.cancel(request_id)
        except Exception:  # already finished or unknown: nothing to free
            logger.debug("engine.cancel(%s) ignored", request_id, exc_info=True)

    @staticmethod
    def _deliver(subscriber: _Subscriber, event) -> None:
        try:
            subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
