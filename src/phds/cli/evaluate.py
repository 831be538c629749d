"""`phds eval`, `phds sweep`, `phds compare`, `phds lm-eval`: thin layers over `phds.evaluation`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from phds.cli import app
from phds.cli.common import check_out_dir, console, parse_ks, parse_points, user_errors

MODEL_HELP = "Checkpoint directory, hub name, or tiny:<family> (e.g. tiny:olmoe)."
TASKS_HELP = (
    "Comma-separated task specs: .jsonl / .txt paths or names in $PHDS_DATA (eval/<name>.jsonl, "
    "text/<name>.txt), e.g. copa,wikitext2_valid."
)


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks is empty, got {text!r}")
    return tasks


def _summary(results: dict) -> None:
    table = Table(title=f"{results['model']} ({results['method']})")
    table.add_column("task")
    table.add_column("metric")
    points = results.get("points", [str(k) for k in results["ks"]])
    for label in points:
        table.add_column(f"k={label}" if label.isdigit() else label, justify="right")
    for name, task in results["tasks"].items():
        metric = task["primary"]
        table.add_row(name, metric, *(f"{task['metrics'][label][metric]['value']:.3f}" for label in points))
        if any(not label.isdigit() for label in points):
            experts = [task["compute"][label]["active_experts"] for label in points]
            table.add_row("", "experts/token", *(f"{e:.2f}" for e in experts))
    if results["latency"]:
        table.add_row(
            "latency",
            "decode ms/token",
            *(f"{results['latency'][label]['decode_ms_per_token']:.2f}" for label in points),
        )
    console.print(table)


def _common_kwargs(limit, num_fewshot, batch_size, max_new_tokens, seed, latency, max_length, ppl_stride, device):
    return dict(
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        seed=seed,
        latency=latency,
        max_length=max_length,
        ppl_stride=ppl_stride,
        device=device,
    )


LIMIT = typer.Option(None, help="First N items per task (windows for perplexity) -- for quick runs.")
FEWSHOT = typer.Option(0, "--num-fewshot", help="Few-shot examples per item, drawn from the same file with --seed.")
BATCH = typer.Option(8, help="Rows per forward; scores equal batch size 1's.")
NEW_TOKENS = typer.Option(64, help="Greedy generation limit (gsm8k / exact-match tasks).")
SEED = typer.Option(0, help="Few-shot sampling and bootstrap seed.")
LATENCY = typer.Option(True, "--latency/--no-latency", help="Measure prefill / decode speed per k.")
MAX_LENGTH = typer.Option(None, help="Cap on tokens per sequence (default: the model's context); perplexity window.")
STRIDE = typer.Option(None, help="Perplexity window stride (default: half the window).")
DEVICE = typer.Option(None, help="cpu, cuda, ... (default: CUDA when present).")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Output directory (results.json, predictions.jsonl, report.md, plots).")],
    k: str | None = typer.Option(
        None,
        "--k",
        help="ks to evaluate, e.g. '1,2,4,8' or '1-4' (default: declared ks), and other operating points after ';': "
        "'2,4;top_p=0.7;skip=0.3;alloc.json' (routing policies, a `phds allocate` file, 'layers=0:2,1:3').",
    ),
    tasks: str = typer.Option(..., help=TASKS_HELP),
    model_name: str | None = typer.Option(None, help="Name shown in reports."),
    limit: int | None = LIMIT,
    num_fewshot: int = FEWSHOT,
    batch_size: int = BATCH,
    max_new_tokens: int = NEW_TOKENS,
    seed: int = SEED,
    latency: bool = LATENCY,
    max_length: int | None = MAX_LENGTH,
    ppl_stride: int | None = STRIDE,
    device: str | None = DEVICE,
) -> None:
    """Evaluate one model at each k: quality with 95% CIs, cross-k agreement, latency; one pass per k."""
    from phds.evaluation import evaluate

    with user_errors():
        ks = parse_points(k) if k is not None else None
        check_out_dir(out)
        results = evaluate(
            model,
            ks,
            _tasks(tasks),
            out_dir=out,
            model_name=model_name,
            **_common_kwargs(
                limit, num_fewshot, batch_size, max_new_tokens, seed, latency, max_length, ppl_stride, device
            ),
        )
    _summary(results)
    console.print(f"wrote {out}/results.json, predictions.jsonl, report.md, frontier.png, agreement.png")


@app.command("sweep")
def sweep_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    k: str | None = typer.Option(None, "--k", help="ks to probe (default: 1 to k_pre)."),
    tasks: str = typer.Option("wikitext2_valid", help=TASKS_HELP),
    limit: int | None = LIMIT,
    num_fewshot: int = FEWSHOT,
    batch_size: int = BATCH,
    max_new_tokens: int = NEW_TOKENS,
    seed: int = SEED,
    latency: bool = LATENCY,
    max_length: int | None = MAX_LENGTH,
    ppl_stride: int | None = STRIDE,
    device: str | None = DEVICE,
    tolerance: float = typer.Option(0.01, help="Smallest drop that counts (absolute for acc, relative for ppl)."),
) -> None:
    """Robustness probe of a base model: evaluate at every k from 1 to k_pre and say where quality falls off."""
    from phds.evaluation import sweep

    with user_errors():
        ks = parse_ks(k) if k is not None else None
        check_out_dir(out)
        results = sweep(
            model,
            ks,
            _tasks(tasks),
            out,
            tolerance=tolerance,
            **_common_kwargs(
                limit, num_fewshot, batch_size, max_new_tokens, seed, latency, max_length, ppl_stride, device
            ),
        )
    _summary(results)
    console.print(f"[bold]verdict:[/] {results['verdict']}")


@app.command("compare")
def compare_command(
    results: Annotated[list[Path], typer.Argument(help="results.json files (or directories holding one).")],
    out: Annotated[Path, typer.Option(help="Output directory (compare.json, compare.md, frontier.png).")],
    seed: int = SEED,
) -> None:
    """Side-by-side table of several results with paired bootstrap differences; oracles at their own k."""
    from phds.evaluation import compare

    with user_errors():
        check_out_dir(out)
        summary = compare(results, out, seed=seed)
    console.print(f"reference: {summary['reference']}; models: {', '.join(summary['models'])}")
    console.print(f"wrote {out}/compare.md, compare.json, frontier.png")


@app.command(
    "lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
)
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness's CLI with the `phds` model registered: phds lm-eval --model phds --model_args
    pretrained=MODEL,k=K --tasks ... (MODEL: a directory, hub name or tiny:<family>; k: experts per token, default
    the checkpoint's default k; all arguments go to lm-eval)."""
    with user_errors():
        from phds.evaluation.lm_eval_adapter import run_cli

        run_cli(list(ctx.args))
