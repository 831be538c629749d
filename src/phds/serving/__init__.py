"""`phds serve`: an OpenAI-compatible server where experts per token (k) is chosen per request; `phds export`.

Layers: `protocol` (pydantic bodies), `service` (request -> engine, errors, k resolution), `autok` (k="auto"),
`runner` (the engine's thread), `app` (FastAPI routes, SSE, metrics), `server` (uvicorn), `export` (fixed-k copy).
The server pieces need the `serve` extra (fastapi, uvicorn, prometheus-client); they are imported on first use, so
`phds.serving.export` and the policy work without it.
"""

from phds.serving.autok import AutoKPolicy
from phds.serving.config import ServeConfig
from phds.serving.export import export, vllm_overrides

_LAZY = {"Service": "phds.serving.service", "background_server": "phds.serving.server", "serve": "phds.serving.server"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phds.serving' has no attribute {name!r}")


__all__ = ["AutoKPolicy", "ServeConfig", "Service", "background_server", "export", "serve", "vllm_overrides"]
