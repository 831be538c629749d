"""`phds serve MODEL`: an OpenAI-compatible server where each request picks its experts per token (k)."""

from __future__ import annotations

import os

import typer

from phds.cli import app
from phds.cli.common import console, parse_ks, user_errors


@app.command()
def serve(
    model: str = typer.Argument(..., help="Checkpoint directory, hub name, or tiny:<family> (e.g. tiny:olmoe)."),
    k_set: str | None = typer.Option(None, help="ks requests may ask for, e.g. '1,2,4' (default: the sidecar's)."),
    default_k: int | None = typer.Option(None, help="k of a request that names none (default: the sidecar's)."),
    allocation: str | None = typer.Option(
        None, help="A `phds allocate` file: every request runs at its per-layer ks (a request naming a k: 400)."
    ),
    served_model_name: str | None = typer.Option(None, help="Model name clients use (default: directory name)."),
    host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless told otherwise."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(None, help="Require 'Authorization: Bearer KEY' (or set PHDS_API_KEY)."),
    max_batch: int = typer.Option(8, help="Requests decoded together."),
    max_queue: int = typer.Option(64, help="Requests allowed to wait for a slot; more get 503 + Retry-After."),
    max_model_len: int | None = typer.Option(None, help="Prompt + completion tokens (default: the model's)."),
    auto_target_ms: float | None = typer.Option(None, help="Per-token latency target that enables k='auto'."),
    auto_queue_step: int = typer.Option(4, help="Waiting requests that lower an auto request's k by one step."),
    drain_timeout_s: float = typer.Option(30.0, help="On SIGTERM, how long in-flight requests may still run."),
    max_body_mb: float = typer.Option(4.0, help="Largest request body in MB; a larger one gets a 413."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, help="Default: CUDA when present, else CPU."),
    compile: bool = typer.Option(False, help="torch.compile the engine's decode step."),
    threads: int | None = typer.Option(
        None, help="CPU threads per decode step (default: the usable cores less those other processes keep busy)."
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow the checkpoint's own modelling code (off by default)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Serve MODEL with OpenAI's API; a request picks k with the body field `k` or the model name NAME@k2."""
    with user_errors():
        from phds.serving import ServeConfig, Service
        from phds.serving.server import serve as run

        config = ServeConfig(
            model=model,
            served_model_name=served_model_name,
            k_set=parse_ks(k_set, "--k-set") if k_set else None,
            default_k=default_k,
            allocation=allocation,
            host=host,
            port=port,
            api_key=api_key or os.environ.get("PHDS_API_KEY") or None,
            max_batch=max_batch,
            max_queue=max_queue,
            max_model_len=max_model_len,
            auto_target_ms=auto_target_ms,
            auto_queue_step=auto_queue_step,
            drain_timeout_s=drain_timeout_s,
            max_body_mb=max_body_mb,
            dtype=dtype,
            device=device,
            compile=compile,
            threads=threads,
            trust_remote_code=trust_remote_code,
            log_level=log_level,
        )
        service = Service.from_config(config)
    auto = f", auto target {config.auto_target_ms} ms" if config.auto_target_ms else ""
    at = f"ks {service.ks} (default k={service.default_k}{auto})"
    if service.allocation is not None:
        at = "per-layer ks " + " ".join(f"{index}:{k}" for index, k in service.allocation.items())
    console.print(
        f"serving [bold]{service.model_name}[/] at {at} on "
        f"http://{config.host}:{config.port}/v1" + ("  (API key required)" if config.api_key else ""),
        soft_wrap=True,
    )
    if service.runner.engine.threads is not None:
        console.print(service.runner.engine.threads.describe(), soft_wrap=True)
    run(config, service)
