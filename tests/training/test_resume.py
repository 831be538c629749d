"""A run killed part-way and resumed ends exactly as an uninterrupted run: same k history, same weights (CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import phds
from phds.training import read_log, train
from tests.training.conftest import fast_config, resumable_config

STEPS = 8


class _Kill(TrainerCallback):
    """Raises after optimizer step `at`, as a crash or a preempted job would end the run."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed after step {self.at}")


def _config(out, resume: bool):
    return resumable_config(out, resume=resume, steps=STEPS)


def _whole_and_killed(config, tmp_path, rows, *, kill_at: int):
    """One uninterrupted run into tmp_path/whole, and the same run into tmp_path/killed, killed at step `kill_at`."""
    whole_model = phds.tiny_model("olmoe")
    whole = train(whole_model, config(tmp_path / "whole", False), train_data=rows, tokenizer=phds.tiny_tokenizer())
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(
            phds.tiny_model("olmoe"),
            config(out, False),
            train_data=rows,
            tokenizer=phds.tiny_tokenizer(),
            callbacks=[_Kill(at=kill_at)],
        )
    return whole_model, whole, out


def test_a_killed_and_resumed_run_ends_with_the_same_k_history_and_weights(tmp_path, addition_rows):
    whole_model = phds.tiny_model("olmoe")
    whole = train(
        whole_model,
        _config(tmp_path / "whole", resume=False),
        train_data=addition_rows,
        tokenizer=phds.tiny_tokenizer(),
    )

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(
            phds.tiny_model("olmoe"),
            _config(out, resume=False),
            train_data=addition_rows,
            tokenizer=phds.tiny_tokenizer(),
            callbacks=[_Kill(at=5)],
        )
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    assert not (out / "checkpoints" / "checkpoint-6").exists()

    resumed_model = phds.tiny_model("olmoe", seed=1)  # other initial weights: the checkpoint must overwrite them
    resumed = train(
        resumed_model, _config(out, resume=True), train_data=addition_rows, tokenizer=phds.tiny_tokenizer()
    )

    assert resumed.global_step == whole.global_step == STEPS
    assert resumed.k_history == whole.k_history
    assert len(set(whole.k_history)) > 1
    for name, value in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert resumed.best_step == whole.best_step
    assert resumed.validation_loss == pytest.approx(whole.validation_loss)
    # the log holds the whole run: the k of steps 0..2 from the killed attempt, 3..7 from the resumed one
    steps = {e["step"]: e["k"] for e in read_log(out) if e["event"] == "step"}
    assert [steps[s] for s in range(STEPS)] == whole.k_history


def test_a_fresh_run_refuses_an_output_dir_holding_another_runs_checkpoints(tmp_path, addition_rows):
    out = tmp_path / "busy"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="earlier run"):
        train("tiny:olmoe", _config(out, resume=False), train_data=addition_rows)


def test_a_resumed_lora_run_restores_its_adapters_and_its_trained_routers(tmp_path, addition_rows):
    def config(out, resume):
        return fast_config(
            out,
            ks=[2, 4],
            lora=True,
            lora_r=2,
            lora_alpha=4,
            max_steps=5,
            save_strategy="steps",
            save_steps=2,
            eval_strategy="no",
            eval_fraction=0.0,
            resume_from_checkpoint="last" if resume else None,
        )

    whole_model, whole, out = _whole_and_killed(config, tmp_path, addition_rows, kill_at=3)
    resumed_model = phds.tiny_model("olmoe")
    resumed = train(resumed_model, config(out, True), train_data=addition_rows, tokenizer=phds.tiny_tokenizer())
    assert resumed.k_history == whole.k_history
    whole_state, resumed_state = whole_model.state_dict(), resumed_model.state_dict()
    assert set(whole_state) == set(resumed_state)
    assert any(".mlp.gate.weight" in name for name in whole_state)
    for name, value in whole_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=0, atol=0, msg=name)
    for name, value in phds.tiny_model("olmoe").state_dict().items():
        if name.endswith("mlp.gate.weight"):
            assert not torch.equal(whole_state[name], value)  # the routers did train


@pytest.mark.slow
def test_a_killed_and_resumed_layer_sampling_run_draws_the_same_per_layer_ks_and_ends_with_the_same_weights(
    tmp_path, addition_rows
):
    def config(out, resume, k_sampling="layer"):
        return resumable_config(out, resume=resume, steps=STEPS, k_sampling=k_sampling)

    whole_model, whole, out = _whole_and_killed(config, tmp_path, addition_rows, kill_at=5)
    log_before = (out / "phds_log.jsonl").read_text()
    # resuming draws the ks the way the killed run did: the other mode is refused before anything is written
    with pytest.raises(ValueError, match=r"`k_sampling`='global'.*trained with k_sampling='layer'"):
        train(phds.tiny_model("olmoe"), config(out, True, "global"), train_data=addition_rows)
    assert (out / "phds_log.jsonl").read_text() == log_before

    resumed_model = phds.tiny_model("olmoe", seed=1)
    resumed = train(resumed_model, config(out, True), train_data=addition_rows, tokenizer=phds.tiny_tokenizer())
    assert resumed.k_history == whole.k_history
    assert all(isinstance(ks, dict) and set(ks) == {0, 1} for ks in whole.k_history)
    assert any(ks[0] != ks[1] for ks in whole.k_history)
    for name, value in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    steps = {e["step"]: e["layer_k"] for e in read_log(out) if e["event"] == "step"}
    assert [{int(i): k for i, k in steps[s].items()} for s in range(STEPS)] == whole.k_history
