"""Helpers shared by the CLI commands: parsing k lists, turning library errors into clean exits."""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


# typer vendors click in recent releases, so `import click` may give other classes than the ones typer raises:
# take them from the exception typer exports.
CLICK_EXCEPTION = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
USAGE_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def command_line() -> str:
    """The `phds ...` command being run, quoted so that it can be pasted back (recorded in results)."""
    return "phds " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])


def parse_ks(text: str, option: str = "--k", minimum: int = 1) -> list[int]:
    """'1,2,4' or '2-4' or '1,3-4' -> sorted unique ints; a ValueError naming the option otherwise (call it inside
    `user_errors`, which prints it as one line).

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
        raise ValueError(f"{option} must be integers like '1,2,4' or '2-4', got {text!r}") from None
    if not ks:
        raise ValueError(f"{option} is empty, got {text!r}")
    if min(ks) < minimum:
        raise ValueError(f"{option} values must be >= {minimum}, got {text!r}")
    return sorted(ks)


def parse_points(text: str, option: str = "--k") -> list:
    """Operating points separated by ';': ks like '1,2,4' or '2-4', policies like 'top_p=0.7' or 'skip=0.3',
    per-layer 'layers=0:2,1:3', or an allocation .json from `phds allocate` (see `phds.points`).

    Example: `parse_points("1-2;skip=0.3") == [1, 2, Skip(0.3)]`.
    """
    from phds.points import parse_point

    points: list = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part[0].isdigit() and not part.endswith(".json"):
            points.extend(parse_ks(part, option))
        else:
            try:
                points.append(parse_point(part))
            except ValueError as error:
                raise ValueError(f"{option}: {error}") from None
    if not points:
        raise ValueError(f"{option} is empty, got {text!r}")
    return points


# Set by `phds --debug`: errors then keep their traceback instead of being printed as one line.
DEBUG = False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return escape(text or type(error).__name__)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print any error as one red line instead of a traceback (`phds --debug` keeps the traceback).

    A user's mistake (ValueError, TypeError, FileNotFoundError, a missing extra) exits 2; anything else is a failure
    of the run, named with its type, and exits 1.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, CLICK_EXCEPTION):  # typer's own ways out: exit codes and usage errors
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        if DEBUG:
            raise
        err_console.print(f"[bold red]error:[/] {_one_line(error)}", soft_wrap=True)
        raise typer.Exit(code=2) from error
    except Exception as error:
        if DEBUG:
            raise
        err_console.print(
            f"[bold red]error:[/] {type(error).__name__}: {_one_line(error)} (run `phds --debug ...` for the traceback)",
            soft_wrap=True,
        )
        raise typer.Exit(code=1) from error


def check_out_dir(out: Path, option: str = "--out") -> None:
    """Refuse an output directory that is an existing file, before any work is done.

    Example: `check_out_dir(Path("results"))`.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"`{option}` {out} is a file, not a directory; choose a directory path")


def check_out_file(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written (a directory, or a parent that is a file), before any work.

    Example: `check_out_file(Path("bench.json"), "--json")`.
    """
    if path.is_dir():
        raise ValueError(f"`{option}` {path} is a directory; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"`{option}` {path}: {parent} is a file, not a directory")
            break
