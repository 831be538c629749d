"""The `phds` command line: one typer app, one module per command, each a thin layer over the Python API."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

app = typer.Typer(
    name="phds",
    help="Post Hoc Declared Sparsity: train, measure and serve one MoE checkpoint whose top-k is dialled at "
    "inference time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error instead of one line."),
) -> None:
    """Post Hoc Declared Sparsity: one MoE checkpoint, any declared top-k at inference time."""
    from phds.cli import common

    common.DEBUG = debug


# Each module registers its command(s) on `app` when imported. They import training, evaluation, serving and the
# benchmark harness inside the command, so `phds --help` does not wait for TRL or FastAPI to load.
COMMAND_MODULES = ("info", "train", "evaluate", "bench", "serve", "export", "demo", "experiment", "allocate")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"phds.cli.{name}")


_register_commands()


# Commands that decode on the CPU in a process of their own: they restart once with an OpenMP wait policy under which
# a step beside a busy process does not stall (`phds.engine.threads`), unless the user set one.
_DECODING_COMMANDS = ("serve", "bench")


def main() -> None:
    """Entry point of the `phds` console script."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in _DECODING_COMMANDS:
        from phds.engine.threads import restart_with_wait_policy

        restart_with_wait_policy(sys.argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our commands draw their own rich progress bars; the libraries' tqdm bars would only interleave with them.
    import datasets
    import transformers

    from phds.cli.common import USAGE_ERROR

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # A usage error (a missing argument, `--max-steps abc`) is one line like every other error, not click's box.
    try:
        code = app(standalone_mode=False)
    except USAGE_ERROR as error:
        message = error.format_message()
        if message:  # no message: `phds` alone, which has just printed its help
            command = error.ctx.command_path if error.ctx is not None else "phds"
            typer.echo(f"error: {message} (see `{command} --help`)", err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
