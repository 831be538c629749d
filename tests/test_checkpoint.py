"""`phds.checkpoint`: the one checkpoint-folder writer swaps folders in atomically and recovers from a crash."""

from __future__ import annotations

import os
import stat

import pytest

from phds import checkpoint


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write(target, text: str, carry=()) -> None:
    with checkpoint.staged_folder(target, carry=carry) as folder:
        (folder / "weights").write_text(text)


def test_a_written_folder_is_0755_whatever_the_umask_and_replaces_the_previous_one(tmp_path):
    target = tmp_path / "ckpt"
    umask = os.umask(0o077)  # what mkdtemp-style private folders would inherit
    try:
        _write(target, "one")
        _write(target, "two")
    finally:
        os.umask(umask)
    assert _mode(target) == 0o755
    assert (target / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old folder left behind


def test_a_failure_mid_write_leaves_the_previous_checkpoint_and_nothing_else(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "one")
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.staged_folder(target) as folder:
            (folder / "weights").write_text("half")
            raise KeyboardInterrupt("killed mid-write")
    assert (target / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_carried_entries_move_into_each_new_version(tmp_path):
    target = tmp_path / "run"
    _write(target, "one")
    (target / "log.jsonl").write_text("step 1\n")
    _write(target, "two", carry=["log.jsonl", "checkpoints"])
    assert (target / "weights").read_text() == "two" and (target / "log.jsonl").read_text() == "step 1\n"


def test_a_crash_between_the_renames_is_finished_by_recover_with_the_carried_entries(tmp_path):
    target = tmp_path / "run"
    # the state a kill leaves after `run` -> `.run.old` and before `.run.staging` -> `run`, one carried entry moved
    old, staging = checkpoint.old_path(target), checkpoint.staging_path(target)
    old.mkdir()
    (old / "weights").write_text("one")
    (old / "log.jsonl").write_text("steps\n")
    staging.mkdir()
    (staging / "weights").write_text("two")
    (staging / "checkpoints").mkdir()
    checkpoint.recover(target, carry=["checkpoints", "log.jsonl"])
    assert (target / "weights").read_text() == "two"  # the staged checkpoint was complete: it wins
    assert (target / "log.jsonl").read_text() == "steps\n" and (target / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_recover_puts_an_old_checkpoint_back_and_drops_an_unfinished_staging_folder(tmp_path):
    alone = tmp_path / "alone"
    checkpoint.old_path(alone).mkdir()
    (checkpoint.old_path(alone) / "weights").write_text("one")
    checkpoint.recover(alone)
    assert (alone / "weights").read_text() == "one"

    unfinished = tmp_path / "unfinished"
    _write(unfinished, "one")
    checkpoint.staging_path(unfinished).mkdir()
    (checkpoint.staging_path(unfinished) / "weights").write_text("ha")
    checkpoint.recover(unfinished)
    assert (unfinished / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "unfinished"]


def test_the_next_write_recovers_first(tmp_path):
    target = tmp_path / "ckpt"
    checkpoint.old_path(target).mkdir()
    (checkpoint.old_path(target) / "weights").write_text("one")
    _write(target, "two")
    assert (target / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
