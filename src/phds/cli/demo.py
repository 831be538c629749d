"""`phds demo`: the whole PHDS story in one command on the built-in tiny model."""

from __future__ import annotations

from pathlib import Path

import typer

from phds.cli import app
from phds.cli.common import check_out_dir, command_line, console, parse_ks, user_errors


@app.command()
def demo(
    out: Path = typer.Option(Path("phds-demo"), "--out", help="Output folder; a re-run reuses finished stages."),
    quick: bool = typer.Option(False, "--quick", help="2 seeds, fewer steps (about 3 minutes): indicative only."),
    seeds: str = typer.Option(None, "--seeds", help="SFT seeds instead of the spec's, e.g. '0-4'."),
    jobs: int = typer.Option(None, "--jobs", help="Runs trained at the same time (default: the cores, at most 4)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage even when a finished one can be reused."),
) -> None:
    """Pretrain a tiny 16-expert MoE, fine-tune PHDS, fixed-k oracles and an ordinary SFT at several seeds, evaluate
    every run at every k, judge PHDS run by run against each baseline, and write OUT/report.md."""
    from phds.demo import run_demo

    with user_errors():
        check_out_dir(out)
        chosen = parse_ks(seeds, "--seeds", minimum=0) if seeds else None
        result = run_demo(
            out, quick=quick, seeds=chosen, jobs=jobs, force=force, say=console.print, command=command_line()
        )
    console.print(
        f"[green]done[/]: {len(result.stages_run)} stages run, {len(result.stages_reused)} reused; open {result.report}"
    )
