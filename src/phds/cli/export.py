"""`phds export MODEL --k 4 OUT`: a plain checkpoint at one fixed k, for engines that fix k when they load."""

from __future__ import annotations

import typer

from phds.cli import app
from phds.cli.common import console, user_errors


@app.command()
def export(
    model: str = typer.Argument(..., help="Checkpoint directory, hub name, or tiny:<family>."),
    out: str = typer.Argument(..., help="Directory of the exported checkpoint."),
    k: int = typer.Option(..., help="Experts per token written as num_experts_per_tok."),
    dtype: str = typer.Option("auto", help="auto (keep), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    trust_remote_code: bool = typer.Option(False, help="Allow the checkpoint's own modelling code (off by default)."),
) -> None:
    """Write MODEL with num_experts_per_tok=K to OUT, and print the equivalent vLLM flag."""
    from phds.serving.export import export as run
    from phds.serving.export import vllm_overrides

    with user_errors():
        path = run(model, k, out, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code)
    console.print(f"exported {model} at k={k} to [bold]{path}[/] (num_experts_per_tok={k})")
    console.print("serve it with a fixed-k engine:  " + f"vllm serve {path}", soft_wrap=True, markup=False)
    console.print(f"or, without exporting:  vllm serve {model} {vllm_overrides(k)}", soft_wrap=True, markup=False)
