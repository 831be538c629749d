"""`phds bench`: decode/prefill speed per k, our engine against stock transformers `generate()` in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from phds.cli import app
from phds.cli.common import check_out_file, console, parse_ks, user_errors


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def bench(
    model: str | None = typer.Argument(None, help="Checkpoint directory, hub name or tiny:<family>."),
    tiny_config: str = typer.Option(
        "olmoe-shape-small",
        help="Random model when no MODEL is given: a preset (olmoe-shape-small, olmoe-shape-small-overhead-only, "
        "olmoe-1b-7b-shape) or 'family:field=value,...'.",
    ),
    dtype: str | None = typer.Option(
        None,
        help="Parameter dtype: float32, bfloat16 or float16 (default: the preset's, bfloat16 for olmoe-1b-7b-shape "
        "and float32 otherwise; the checkpoint's for MODEL). Random models are built in it, never in float32 first.",
    ),
    k: str = typer.Option("1,2,4,8", "--k", help="Experts per token to measure, e.g. '1,2,4,8'."),
    batch: str = typer.Option("1", "--batch", help="Decode batch sizes, e.g. '1,8'."),
    prompt_len: int = typer.Option(64, help="Prompt tokens per request."),
    new_tokens: int = typer.Option(32, help="Decode steps timed per measurement."),
    repeats: int = typer.Option(3, help="Measurements per figure; medians are reported."),
    stock: str = typer.Option("grouped_mm,eager", help="Stock experts implementations to compare against."),
    decode: bool = typer.Option(True, help="Time decode and prefill per k (--no-decode for a training-only run)."),
    mixed: bool = typer.Option(True, help="Also time 8 requests at k=1,1,2,2,4,4,8,8 as one batch vs one by one."),
    train: bool = typer.Option(False, help="Also time a training step (forward+backward) per k."),
    train_batch: int = typer.Option(4, help="Training step batch size."),
    train_seq: int = typer.Option(128, help="Training step sequence length."),
    threads: int | None = typer.Option(
        None, help="torch threads (default: the usable cores less those other processes keep busy at start-up)."
    ),
    compile: bool = typer.Option(False, help="torch.compile the engine's decode step (compiled before timing)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure to this JSON file."),  # noqa: B008
) -> None:
    """Time decode (ms/token), prefill (tokens/s) and optionally training per k, engine vs stock, with the
    bandwidth floor and this project's performance targets."""
    from phds.bench import BenchConfig, check_targets
    from phds.bench import bench as run_bench
    from phds.engine.threads import ThreadPolicy

    with user_errors():
        if json_out is not None:
            check_out_file(json_out, "--json")
        policy = ThreadPolicy(threads, adaptive=False)
        console.print(policy.describe(), soft_wrap=True)
        config = BenchConfig(
            model=model,
            tiny_config=None if model is not None else tiny_config,
            dtype=dtype,
            ks=parse_ks(k),
            batches=parse_ks(batch, "--batch"),
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            repeats=repeats,
            stock=_names(stock),
            decode=decode,
            mixed=mixed,
            train=train,
            train_batch=train_batch,
            train_seq=train_seq,
            threads=policy.threads,
            compile=compile,
        )
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task("starting", total=None)
            results = run_bench(config, progress=lambda text: progress.update(task, description=text))
    results["targets"] = check_targets(results)
    _print(results)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_out}")


def _print(results: dict) -> None:
    from phds.bench import result_tables, run_summary

    console.print(run_summary(results))
    for title, header, rows in result_tables(results):
        table = Table(title=title)
        for column in header:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    targets = Table(title="project targets (phds.bench.TARGETS; details in docs/performance.md)")
    targets.add_column("target")
    targets.add_column("this run", justify="right")
    for name, value in results["targets"].items():
        targets.add_row(name, _target_cell(value))
    console.print(targets)


def _target_cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):  # dial_payoff: the two ratios it compares
        return f"{_target_cell(value['met'])} (time {value['time_ratio']:.2f}, floors {value['floor_ratio']:.2f})"
    return f"{value:.2f}"
