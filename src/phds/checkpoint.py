"""The one writer of checkpoint folders: stage beside the target, swap it in with renames, recover a crash.

`phds.save`, training's best-checkpoint saves and `phds export` all write through `write_checkpoint`, so every
checkpoint folder is 0755, replaces its predecessor atomically, and a crash at any point leaves either the old or
the new checkpoint at the target, never a mix. The folder dance for a target `out`:

1. write everything into `.out.staging` (a leftover from a crash is removed first);
2. rename `out` to `.out.old`;
3. move the `carry` entries (a training run's own files: its checkpoints and log) from `.out.old` into the staging
   folder;
4. rename `.out.staging` to `out`, remove `.out.old`.

`recover` reads which step a crash stopped at from which folders exist: `out` beside `.out.staging` means the
write did not finish (drop the staging folder); `.out.old` without `out` means the new checkpoint was complete
(finish steps 3 and 4); `.out.old` beside `out` means only the clean-up was left.

`crash_point(name)` marks the points between these steps (and those of training's resumable checkpoints); a test
sets `PHDS_CRASH_AT=name` and the process SIGKILLs itself there, so recovery is tested against real kills.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from phds.sidecar import Sidecar, write_sidecar

FOLDER_MODE = 0o755  # a temporary directory is private (0700); a checkpoint is for sharing
CRASH_AT = "PHDS_CRASH_AT"  # environment variable: the crash point at which the process kills itself (tests)


_crash_points_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here when the environment variable `PHDS_CRASH_AT` is `name` (the first time this point
    is reached) or `name#n` (the n-th time): a test hook, so recovery is tested against real kills.

    Example: `crash_point("checkpoint.staged")` is a no-op unless `PHDS_CRASH_AT=checkpoint.staged`.
    """
    wanted = os.environ.get(CRASH_AT)
    if not wanted or wanted.partition("#")[0] != name:
        return
    _crash_points_reached[name] = _crash_points_reached.get(name, 0) + 1
    if _crash_points_reached[name] == int(wanted.partition("#")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def staging_path(target: str | os.PathLike) -> Path:
    """Where a checkpoint for `target` is written before it is swapped in.

    Example: `staging_path("out/run") == Path("out/.run.staging")`.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.staging")


def old_path(target: str | os.PathLike) -> Path:
    """Where the previous checkpoint at `target` waits while the new one is swapped in.

    Example: `old_path("out/run") == Path("out/.run.old")`.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def _move_entries(source: Path, destination: Path, names: Sequence[str]) -> None:
    for name in names:
        if (source / name).exists() and not (destination / name).exists():
            os.replace(source / name, destination / name)


def recover(target: str | os.PathLike, *, carry: Sequence[str] = ()) -> None:
    """Bring `target` back to one whole checkpoint after a crash in `write_checkpoint` (a no-op otherwise).

    Example: `phds.checkpoint.recover("out/run", carry=["checkpoints", "phds_log.jsonl"])`.
    """
    target = Path(target)
    staging, old = staging_path(target), old_path(target)
    if old.is_dir() and not target.exists():
        if staging.is_dir():  # crashed between the renames: the staged checkpoint is complete
            _move_entries(old, staging, carry)
            os.replace(staging, target)
        else:  # a swap whose staging folder is gone: the previous checkpoint is all there is
            os.replace(old, target)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, carry: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty folder beside `target`; when the block ends, make it 0755 and swap it in for `target`,
    moving the `carry` entries of the previous `target` into it. If the block raises, `target` is untouched.

    Example: `with staged_folder("out") as folder: (folder / "a.txt").write_text("a")`.
    """
    target = Path(target)
    recover(target, carry=carry)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging, old = staging_path(target), old_path(target)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.chmod(staging, FOLDER_MODE)
    crash_point("checkpoint.staged")
    if target.exists():
        os.replace(target, old)
        crash_point("checkpoint.moved_aside")
        _move_entries(old, staging, carry)
        crash_point("checkpoint.carried")
    os.replace(staging, target)
    crash_point("checkpoint.swapped_in")
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    model: nn.Module,
    target: str | os.PathLike,
    *,
    tokenizer=None,
    sidecar: Sidecar | None = None,
    state_dict: dict | None = None,
    carry: Sequence[str] = (),
) -> Path:
    """Write `model` as a plain HF checkpoint (safetensors) with its tokenizer and sidecar to `target`, atomically.

    The model is written as it is: callers dial the k its config should say (`phds.save` writes k_pre, `phds
    export` the exported k). `state_dict` replaces the model's own (a sharded model's gathered weights).

    Example: `write_checkpoint(model, "out", tokenizer=tok, sidecar=Sidecar(ks=[2, 4], k_pre=4))`.
    """
    target = Path(target)
    with staged_folder(target, carry=carry) as folder:
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(folder, safe_serialization=True, **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if sidecar is not None:
            write_sidecar(folder, sidecar)
    return target
