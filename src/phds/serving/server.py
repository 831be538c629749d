"""Run the app under uvicorn: in the foreground for `phds serve`, or in a background thread for tests and benchmarks.

Shutdown on SIGTERM/SIGINT is uvicorn's graceful one: stop accepting, let in-flight requests finish for at most
`drain_timeout_s`, cancel the rest, then the app's lifespan stops the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from phds.serving.app import create_app
from phds.serving.config import ServeConfig
from phds.serving.service import SHUTTING_DOWN, Service

logger = logging.getLogger(__name__)


# After the drain bound, how long the requests ended with `shutting_down` get to send that answer before uvicorn
# cancels what is left.
_ANSWER_GRACE_S = 5.0


def uvicorn_config(service: Service, config: ServeConfig, port: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(service, api_key=config.api_key, max_body_bytes=int(config.max_body_mb * 2**20)),
        host=config.host,
        port=config.port if port is None else port,
        timeout_graceful_shutdown=config.drain_timeout_s + _ANSWER_GRACE_S,
        log_level=config.log_level,
        access_log=False,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain bound that answers instead of cutting.

    On SIGTERM/SIGINT it stops accepting, refuses new requests on open connections with 503 `shutting_down`, and
    lets in-flight requests finish for `drain_timeout_s`; then every request still waiting or running is ended
    with the documented 503 `shutting_down` error (an error event, then `[DONE]`, on a stream), and the server
    exits once those answers are sent (uvicorn cancels what is left `_ANSWER_GRACE_S` later).
    """

    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.service, self.drain_timeout_s = service, drain_timeout_s

    async def shutdown(self, sockets=None) -> None:
        self.service.closing = True
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout_s, self._give_up)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _give_up(self) -> None:
        if self.service.in_flight:
            logger.warning("drain bound passed: ending %d request(s) with 503 shutting_down", self.service.in_flight)
        self.service.runner.abort_all(SHUTTING_DOWN)


def serve(config: ServeConfig, service: Service | None = None) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (blocking).

    Example: `phds.serving.serve(ServeConfig(model="tiny:olmoe", k_set=[1, 2, 4], port=8000))`.
    """
    service = service or Service.from_config(config)
    DrainingServer(uvicorn_config(service, config), service, config.drain_timeout_s).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def background_server(service: Service, config: ServeConfig, *, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `service` from a thread on a free loopback port; yields the base URL (`http://127.0.0.1:PORT/v1`).

    Example:
        >>> with background_server(service, ServeConfig(model="tiny:olmoe")) as base_url:
        ...     openai.OpenAI(base_url=base_url, api_key="x").completions.create(model=..., prompt="hi")
    """
    port = config.port or free_port(config.host)
    server = DrainingServer(uvicorn_config(service, config, port=port), service, config.drain_timeout_s)
    thread = threading.Thread(target=server.run, name="phds-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {config.host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(config.drain_timeout_s + 30)
