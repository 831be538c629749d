"""`phds allocate MODEL --budget 3 --data calib.jsonl --out alloc.json`: a k per MoE layer for a mean-k budget."""

from __future__ import annotations

from pathlib import Path

import typer

from phds.cli import app
from phds.cli.common import check_out_file, console, user_errors


@app.command()
def allocate(
    model: str = typer.Argument(..., help="Checkpoint directory, hub name, or tiny:<family>."),
    budget: float = typer.Option(..., help="Mean k over MoE layers to reach (at most), e.g. 3 or 2.5."),
    data: str = typer.Option(..., help="Calibration rows (.jsonl/.json/.parquet/.csv/.txt or a datasets name)."),
    out: Path = typer.Option(..., help="JSON file to write; a valid `phds serve --allocation`."),
    start: int | None = typer.Option(None, help="Every layer's k before the first cut (default: k_pre)."),
    min_k: int = typer.Option(1, help="No layer goes below this k."),
    max_length: int = typer.Option(1024, help="Tokens per calibration row (longer rows keep their start)."),
    batch_size: int = typer.Option(8, help="Rows per forward pass."),
    progress: bool = typer.Option(True, help="Show a progress bar over the greedy steps."),
) -> None:
    """Choose each MoE layer's k greedily on calibration loss (the cheapest cut first) until the mean k meets
    BUDGET, and write the allocation to OUT."""
    with user_errors():
        from phds.allocation import allocate as run
        from phds.allocation import save_allocation

        check_out_file(out, "--out")
        result = run(
            model,
            budget,
            data,
            start=start,
            min_k=min_k,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
        )
        path = save_allocation(result, out)
    ks = "  ".join(f"{index}:{k}" for index, k in result.ks.items())
    console.print(f"layer:k  {ks}", soft_wrap=True)
    console.print(
        f"mean k {result.mean_k:.3g} (budget {result.budget:g}); calibration loss {result.loss_start:.4f} at the "
        f"start -> {result.loss_end:.4f}",
        soft_wrap=True,
    )
    console.print(f"wrote [bold]{path}[/]; serve it with `phds serve {model} --allocation {path}`", soft_wrap=True)
