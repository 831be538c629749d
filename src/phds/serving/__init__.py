"""`phds serve`: an OpenAI-compatible server where experts per token (k) is chosen per request; `phds export`.

Layers: `protocol` (pydantic bodies), `service` (request -> engine, errors, k resolution), `autok` (k="auto"),
`runner` (the engine's thread), `app` (FastAPI routes, SSE, metrics), `server` (uvicorn), `export` (fixed-k copy).
"""

from phds.serving.autok import AutoKPolicy
from phds.serving.config import ServeConfig
from phds.serving.export import export, vllm_overrides
from phds.serving.server import background_server, serve
from phds.serving.service import Service

__all__ = ["AutoKPolicy", "ServeConfig", "Service", "background_server", "export", "serve", "vllm_overrides"]
