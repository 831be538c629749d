"""Run the app under uvicorn: in the foreground for `phds serve`, or in a background thread for tests and benchmarks.

Shutdown on SIGTERM/SIGINT is uvicorn's graceful one: stop accepting, let in-flight requests finish for at most
`drain_timeout_s`, cancel the rest, then the app's lifespan stops the engine thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from phds.serving.app import create_app
from phds.serving.config import ServeConfig
from phds.serving.service import Service

logger = logging.getLogger(__name__)


def uvicorn_config(service: Service, config: ServeConfig, port: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(service, api_key=config.api_key),
        host=config.host,
        port=config.port if port is None else port,
        timeout_graceful_shutdown=config.drain_timeout_s,
        log_level=config.log_level,
        access_log=False,
    )


def serve(config: ServeConfig, service: Service | None = None) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (blocking).

    Example: `phds.serving.serve(ServeConfig(model="tiny:olmoe", k_set=[1, 2, 4], port=8000))`.
    """
    service = service or Service.from_config(config)
    uvicorn.Server(uvicorn_config(service, config)).run()


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
    server = uvicorn.Server(uvicorn_config(service, config, port=port))
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
