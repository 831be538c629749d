"""`phds experiment`: every arm × seed of a spec trained, evaluated and judged run by run."""

from __future__ import annotations

from pathlib import Path

import typer

from phds.cli import app
from phds.cli.common import check_out_dir, command_line, console, parse_ks, user_errors


@app.command()
def experiment(
    spec: Path = typer.Argument(..., help="The experiment spec: a .toml or .yaml file (see docs/experiments.md)."),
    out: Path = typer.Option(..., "--out", help="Output folder; a re-run reuses finished stages."),
    seeds: str = typer.Option(None, "--seeds", help="Override the spec's SFT seeds, e.g. '0-4' or '0,1,2'."),
    jobs: int = typer.Option(1, "--jobs", help="SFT runs trained at the same time, each in its own process."),
    threads: int = typer.Option(None, "--threads", help="torch threads per run (default: all cores / jobs)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage (and allow changed judging rules)."),
) -> None:
    """Train every arm of SPEC at every seed, evaluate each run at its ks, compare the runs against the declared
    margins, and write OUT/results.json and OUT/report.md."""
    from phds.experiment import load_spec, run_experiment

    with user_errors():
        check_out_dir(out)
        overrides = {"seeds": parse_ks(seeds, "--seeds", minimum=0)} if seeds else None
        loaded = load_spec(spec, out, overrides)
        result = run_experiment(
            loaded, out, force=force, jobs=jobs, threads=threads, say=console.print, command=command_line()
        )
    console.print(
        f"[green]done[/]: {len(result.stages_run)} stages run, {len(result.stages_reused)} reused; open {result.report}"
    )
