"""`phds bench`: decode/prefill speed per k, our engine against stock transformers `generate()` in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from phds.cli import app
from phds.cli.common import console, parse_ks, user_errors


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def bench(
    model: str | None = typer.Argument(None, help="Checkpoint directory, hub name or tiny:<family>."),
    tiny_config: str | None = typer.Option(
        None, help="Random model instead of MODEL: a preset ('issue7', the default) or 'family:field=value,...'."
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
    threads: int | None = typer.Option(None, help="torch threads (default: torch's)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure to this JSON file."),  # noqa: B008
) -> None:
    """Time decode (ms/token), prefill (tokens/s) and optionally training per k, engine vs stock, with the
    bandwidth floor and the issue's goals."""
    from phds.engine.benchmark import BenchConfig
    from phds.engine.benchmark import bench as run_bench

    with user_errors():
        config = BenchConfig(
            model=model,
            tiny_config=None if model is not None else (tiny_config or "issue7"),
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
            threads=threads,
        )
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task("starting", total=None)
            results = run_bench(config, progress=lambda text: progress.update(task, description=text))
    _print(results)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_out}")


def _print(results: dict) -> None:
    machine, info = results["machine"], results["model"]
    console.print(
        f"[bold]{info['class']}[/] {info['parameters'] / 1e6:.0f}M params {info['dtype']}, {info['num_experts']} "
        f"experts, k_pre {info['k_pre']}; {machine['threads']} threads, bandwidth {machine['bandwidth_GBps']:.1f} GB/s"
    )
    stock = list(results["config"]["stock"])
    if results["decode"]:
        table = Table(title="decode (ms per token per sequence; medians)")
        for column in (
            ["k", "batch", "engine ms", "floor ms", "x floor"]
            + [f"{s} ms" for s in stock]
            + [f"vs {s}" for s in stock]
        ):
            table.add_column(column, justify="right")
        for row in results["decode"]:
            table.add_row(
                str(row["k"]),
                str(row["batch"]),
                f"{row['engine_ms']:.2f}",
                f"{row['floor_ms']:.2f}" if "floor_ms" in row else "-",
                f"{row['x_floor']:.2f}" if "x_floor" in row else "-",
                *[f"{row['stock_ms'][s]:.2f}" for s in stock],
                *[f"{row['speedup'][s]:.2f}x" for s in stock],
            )
        console.print(table)
        table = Table(title="prefill (tokens/s; medians)")
        for column in ["k", "batch", "tokens", "engine"] + stock + ["vs best stock"]:
            table.add_column(column, justify="right")
        for row in results["prefill"]:
            ratio = row["vs_best_stock"]
            table.add_row(
                str(row["k"]),
                str(row["batch"]),
                str(row["tokens"]),
                f"{row['engine_tok_s']:.0f}",
                *[f"{row['stock_tok_s'][s]:.0f}" for s in stock],
                f"{ratio:.2f}x" if ratio is not None else "-",
            )
        console.print(table)
    mixed = results["mixed"]
    if mixed is not None:
        console.print(
            f"mixed-k batch k={mixed['ks']}: {mixed['batched_tok_s']:.1f} tok/s as one batch vs "
            f"{mixed['sequential_tok_s']:.1f} tok/s one after another = {mixed['speedup']:.2f}x; outputs identical: "
            f"{mixed['outputs_identical']}"
        )
    if results["train"]:
        table = Table(title="training step, forward + backward (s; medians)")
        for column in ["k", "batch x seq", "phds", "grouped_mm", "speedup"]:
            table.add_column(column, justify="right")
        for row in results["train"]:
            table.add_row(
                str(row["k"]),
                f"{row['batch']}x{row['seq']}",
                f"{row['phds_s']:.3f}",
                f"{row['grouped_mm_s']:.3f}",
                f"{row['speedup_vs_grouped_mm']:.2f}x",
            )
        console.print(table)
    console.print(f"goals: {json.dumps(results['goals'])}")
