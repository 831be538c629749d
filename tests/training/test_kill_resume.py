"""A training run SIGKILLed at any point of a save resumes, and ends exactly as an uninterrupted run.

A real training subprocess kills itself (SIGKILL) at a named crash point of the saving code (`PHDS_CRASH_AT`, see
`phds.checkpoint.crash_point`); the run is then resumed with `resume_from_checkpoint="last"` and compared with a
run that was never killed: same steps, same weights, same log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phds
from phds.training import read_log, train
from tests.training.conftest import ADDITION, fast_config, resumable_config

STEPS = 8
ROOT = Path(__file__).resolve().parents[2]


def _config(out, resume: bool):
    return resumable_config(out, resume=resume, steps=STEPS)


def _train_in_subprocess(out: Path, crash_at: str) -> subprocess.CompletedProcess:
    code = (
        "import sys, phds\n"
        "from phds.training import train\n"
        "from tests.training.conftest import ADDITION\n"
        "from tests.training.test_kill_resume import _config\n"
        "train(phds.tiny_model('olmoe'), _config(sys.argv[1], resume=False), train_data=list(ADDITION),\n"
        "      tokenizer=phds.tiny_tokenizer())\n"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PHDS_CRASH_AT": crash_at, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The run that was never killed: its result, weights and log."""
    out = tmp_path_factory.mktemp("whole") / "run"
    model = phds.tiny_model("olmoe")
    result = train(model, _config(out, resume=False), train_data=list(ADDITION), tokenizer=phds.tiny_tokenizer())
    return result, model.state_dict(), read_log(out)


def _history(log: list[dict]) -> list[tuple]:
    """What the log says happened, without timings: (event, step, k) of every line and the validation losses."""
    return [(e["event"], e["step"], e.get("k"), "eval_loss" in e) for e in log]


def _kill_then_resume(tmp_path, crash_at: str, caplog):
    out = tmp_path / "run"
    killed = _train_in_subprocess(out, crash_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    model = phds.tiny_model("olmoe", seed=1)  # other initial weights: the checkpoint must overwrite them
    with caplog.at_level(logging.WARNING, logger="phds.training.train"):
        result = train(model, _config(out, resume=True), train_data=list(ADDITION), tokenizer=phds.tiny_tokenizer())
    return out, killed, result, model.state_dict()


def _assert_same_run(out, result, state, whole):
    whole_result, whole_state, whole_log = whole
    assert result.global_step == whole_result.global_step == STEPS
    assert result.k_history == whole_result.k_history
    for name, value in whole_state.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert result.best_step == whole_result.best_step
    assert result.validation_loss == pytest.approx(whole_result.validation_loss)
    # the log describes the model's history: every step once, every log once, as in the run never killed
    assert _history(read_log(out)) == _history(whole_log)
    assert not list(out.parent.glob(".run.*")) and not list((out / "checkpoints").glob(".*"))


@pytest.mark.slow
def test_a_kill_while_a_resumable_checkpoint_is_written_resumes_from_the_newest_complete_one(tmp_path, caplog, whole):
    # the second resumable checkpoint (step 6) is killed after its weights were written, before the rest
    out, _, result, state = _kill_then_resume(tmp_path, "trainer_checkpoint.model_written#2", caplog)
    assert "resuming from" in caplog.text and "checkpoint-3 (step 3)" in caplog.text
    _assert_same_run(out, result, state, whole)
    assert json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8


@pytest.mark.slow
def test_a_checkpoint_left_half_written_in_place_is_skipped_and_removed(tmp_path, caplog, whole):
    # what a kill mid-write left before checkpoints were written aside: a checkpoint-N without its trainer state
    out2 = tmp_path / "run"
    killed = _train_in_subprocess(out2, "trainer_checkpoint.staged#2")  # step 6 complete, not yet renamed
    assert killed.returncode == -signal.SIGKILL
    staged = next((out2 / "checkpoints").glob(".checkpoint-6.staging"))
    half = out2 / "checkpoints" / "checkpoint-6"
    os.replace(staged / "checkpoint-6", half)
    (half / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="phds.training.train"):
        resumed_model = phds.tiny_model("olmoe", seed=1)
        resumed = train(
            resumed_model, _config(out2, resume=True), train_data=list(ADDITION), tokenizer=phds.tiny_tokenizer()
        )
    assert "incomplete" in caplog.text and "checkpoint-3 (step 3)" in caplog.text
    _assert_same_run(out2, resumed, resumed_model.state_dict(), whole)


@pytest.mark.parametrize(
    "crash_at",
    ["checkpoint.staged", "checkpoint.moved_aside", "checkpoint.carried", "checkpoint.swapped_in"],
)
@pytest.mark.slow
def test_a_kill_during_the_best_model_save_resumes_with_the_runs_checkpoints(tmp_path, caplog, whole, crash_at):
    # the first best-model save (step 4) is killed; the resumable checkpoint of step 3 must survive it
    out, _, result, state = _kill_then_resume(tmp_path, crash_at, caplog)
    assert "checkpoint-3 (step 3)" in caplog.text
    assert "nothing to resume" not in caplog.text
    _assert_same_run(out, result, state, whole)
    assert phds.read_sidecar(out).made_by["best_step"] == whole[0].best_step


@pytest.mark.slow
def test_a_resumed_runs_log_repeats_no_step(tmp_path, caplog, whole):
    # killed at the last save (step 8), after steps 6 and 7 and the validation of step 8 were logged: the resumed
    # run re-runs them from checkpoint-6, and each is logged once
    out, _, result, state = _kill_then_resume(tmp_path, "trainer_checkpoint.model_written#3", caplog)
    steps = [e["step"] for e in read_log(out) if e["event"] == "step"]
    assert steps == list(range(STEPS))
    assert [e["step"] for e in read_log(out) if "eval_loss" in e] == [4, 8]
    assert "checkpoint-6 (step 6)" in caplog.text
    _assert_same_run(out, result, state, whole)


def test_an_incomplete_checkpoint_named_for_resuming_is_refused_before_anything_is_written(tmp_path):
    half = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # the weights' config, no trainer state: killed while being written
    config = fast_config(tmp_path / "run", resume_from_checkpoint=str(half))
    with pytest.raises(ValueError, match=r"`resume_from_checkpoint`=.*checkpoint-6.* is incomplete"):
        train("tiny:olmoe", config, train_data=list(ADDITION))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
