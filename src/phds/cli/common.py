"""Helpers shared by the CLI commands: parsing k lists, turning library errors into clean exits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def parse_ks(text: str, option: str = "--k", minimum: int = 1) -> list[int]:
    """'1,2,4' or '2-4' or '1,3-4' -> sorted unique ints; a clear error otherwise.

    Example: `parse_ks("2-4,8") == [2, 3, 4, 8]`.
    """
    ks: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                ks.update(range(low, high + 1))
            elif part:
                ks.add(int(part))
    except ValueError:
        raise typer.BadParameter(f"{option} must be integers like '1,2,4' or '2-4', got {text!r}") from None
    if not ks:
        raise typer.BadParameter(f"{option} is empty")
    if min(ks) < minimum:
        raise typer.BadParameter(f"{option} values must be >= {minimum}, got {text!r}")
    return sorted(ks)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ValueError/TypeError/FileNotFoundError as one red line and exit 2, instead of a traceback."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        err_console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
        raise typer.Exit(code=2) from error
