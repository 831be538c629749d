"""`phds demo`: the whole PHDS story in one command on the built-in tiny model."""

from __future__ import annotations

from pathlib import Path

import typer

from phds.cli import app
from phds.cli.common import console, user_errors


@app.command()
def demo(
    out: Path = typer.Option(Path("phds-demo"), "--out", help="Output folder; a re-run reuses finished stages."),
    quick: bool = typer.Option(False, "--quick", help="Fewer steps and a smaller evaluation (about 3 minutes)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage even when a finished one can be reused."),
    seed: int = typer.Option(0, help="Seed of the data, the model and every training run."),
) -> None:
    """Pretrain a tiny 16-expert MoE, probe it at every k, train fixed-k oracles and one PHDS model, evaluate and
    compare them, and write OUT/report.md."""
    from phds.demo import DemoConfig, run_demo

    with user_errors():
        config = DemoConfig.quick(seed=seed) if quick else DemoConfig(seed=seed)
        result = run_demo(out, config, force=force, say=console.print)
    console.print(
        f"[green]done[/]: {len(result.stages_run)} stages run, {len(result.stages_reused)} reused; "
        f"open {result.report}"
    )
