"""The `phds` console entry point: usage errors are one line with exit 2, and `python -m phds.cli` is the same
program (the README launches it that way under accelerate)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phds.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "tiny:olmoe", "--max-steps", "abc"], "Invalid value for '--max-steps'"),
        (["train"], "Missing argument 'model'"),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(args, says):
    done = run(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "╭" not in done.stderr


@pytest.mark.slow
def test_python_m_phds_cli_runs_the_commands():
    done = run("info", "tiny:olmoe")
    assert done.returncode == 0, done.stderr
    assert "k_pre" in done.stdout


def test_user_errors_lets_typers_own_exits_and_usage_errors_through():
    import typer

    from phds.cli.common import user_errors

    with pytest.raises(typer.Exit) as exited, user_errors():
        raise typer.Exit(code=3)
    assert exited.value.exit_code == 3
    with pytest.raises(typer.BadParameter), user_errors():
        raise typer.BadParameter("--k is empty")
