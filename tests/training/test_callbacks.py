"""Callbacks in isolation: the dial per step, the progress bar on rank zero only, best-checkpoint bookkeeping."""

from __future__ import annotations

import json

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

import phds
from phds.schedule import PHDSSchedule
from phds.training import BestCheckpointCallback, PHDSCallback, RichProgressCallback
from phds.training.callbacks import JsonlLogCallback

ARGS = TrainingArguments(output_dir="unused", report_to="none")


def _state(step=0, max_steps=10, rank_zero=True, log_history=None):
    state = TrainerState(max_steps=max_steps, global_step=step, is_world_process_zero=rank_zero)
    state.log_history = log_history or []
    return state


def test_the_phds_callback_dials_the_schedules_k_and_restores_the_k_on_train_end():
    model = phds.tiny_model("olmoe")
    schedule = PHDSSchedule(ks=[1, 2, 3], seed=4)
    callback = PHDSCallback(schedule)
    callback.on_train_begin(ARGS, _state(), TrainerControl(), model=model)
    for step in range(10):
        callback.on_step_begin(ARGS, _state(step), TrainerControl(), model=model)
        assert phds.get_k(model) == schedule.k_at(step, 10)
    assert callback.k_history == schedule.sequence(10)
    logs = {"loss": 1.0}
    callback.on_log(ARGS, _state(10), TrainerControl(), logs=logs)
    assert logs["k"] == schedule.k_at(9, 10)
    callback.on_train_end(ARGS, _state(10), TrainerControl(), model=model)
    assert phds.get_k(model) == 4


def _routed_ks(model) -> dict[int, int]:
    return {layer.index: layer.router.top_k for layer in phds.moe_layers(model)}


def test_with_layer_sampling_the_phds_callback_dials_each_layers_own_k_and_logs_their_mean(tmp_path):
    model = phds.tiny_model("olmoe", num_hidden_layers=4)
    schedule = PHDSSchedule(ks=[1, 2, 3, 4], seed=4, sampling="layer")
    callback = PHDSCallback(schedule)
    log = JsonlLogCallback(tmp_path / "log.jsonl", callback)
    callback.on_train_begin(ARGS, _state(), TrainerControl(), model=model)
    for step in range(10):
        callback.on_step_begin(ARGS, _state(step), TrainerControl(), model=model)
        log.on_step_begin(ARGS, _state(step), TrainerControl())
        assert _routed_ks(model) == schedule.ks_at(step, 10, [0, 1, 2, 3])
    assert callback.k_history == [schedule.ks_at(step, 10, [0, 1, 2, 3]) for step in range(10)]
    assert any(len(set(ks.values())) > 1 for ks in callback.k_history)  # layers did differ within a step
    last = callback.k_history[-1]
    logs = {"loss": 1.0}
    callback.on_log(ARGS, _state(10), TrainerControl(), logs=logs)
    assert logs["k"] == sum(last.values()) / 4
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [{int(i): k for i, k in e["layer_k"].items()} for e in lines] == callback.k_history
    assert [e["k"] for e in lines] == [sum(ks.values()) / 4 for ks in callback.k_history]
    callback.on_train_end(ARGS, _state(10), TrainerControl(), model=model)
    assert phds.get_k(model) == 4


def test_callbacks_on_different_ranks_dial_the_same_per_layer_ks_without_talking():
    # each "rank" builds its own model, schedule and callback; the ks come from (seed, step, layer) alone
    ranks = []
    for _ in range(2):
        model = phds.tiny_model("qwen2_moe", num_hidden_layers=3)
        callback = PHDSCallback(PHDSSchedule(ks=[1, 2, 3, 4], seed=9, sampling="layer"))
        callback.on_train_begin(ARGS, _state(max_steps=8), TrainerControl(), model=model)
        dialled = []
        for step in range(8):
            callback.on_step_begin(ARGS, _state(step, 8), TrainerControl(), model=model)
            dialled.append(_routed_ks(model))
        ranks.append(dialled)
    assert ranks[0] == ranks[1]
    assert len({tuple(ks.values()) for ks in ranks[0]}) > 1


def test_a_resumed_layer_sampling_callback_reads_the_per_layer_ks_back_from_the_log(tmp_path):
    model = phds.tiny_model("olmoe")
    path = tmp_path / "log.jsonl"
    first = PHDSCallback(PHDSSchedule(ks=[1, 2, 3, 4], seed=1, sampling="layer"))
    log = JsonlLogCallback(path, first)
    first.on_train_begin(ARGS, _state(max_steps=6), TrainerControl(), model=model)
    for step in range(4):
        first.on_step_begin(ARGS, _state(step, 6), TrainerControl(), model=model)
        log.on_step_begin(ARGS, _state(step, 6), TrainerControl())
    # the log is what counts on resume (not a recomputation): make step 1 differ from the schedule's draw
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[1]["layer_k"] = {"0": 4, "1": 4} if first.k_history[1] != {0: 4, 1: 4} else {"0": 1, "1": 1}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    resumed = PHDSCallback(PHDSSchedule(ks=[1, 2, 3, 4], seed=1, sampling="layer"), history_path=path)
    resumed.on_train_begin(ARGS, _state(3, 6), TrainerControl(), model=model)
    expected = [{int(i): k for i, k in e["layer_k"].items()} for e in lines[:3]]
    assert resumed.k_history == expected and expected[1] != first.k_history[1]
    resumed.on_step_begin(ARGS, _state(3, 6), TrainerControl(), model=model)
    assert resumed.k_history[3] == first.k_history[3]


def test_the_phds_callback_applies_epsilon_and_renormalisation_options():
    model = phds.tiny_model("olmoe")  # OLMoE does not renormalise its top-k weights by itself
    router = phds.moe_layers(model)[0].router
    hidden_TD = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, k_pre_weights_TK, _ = router(hidden_TD)
    for epsilon, renormalize in [(1e-6, None), (0.0, True), (1e-6, True)]:
        callback = PHDSCallback(PHDSSchedule.fixed(2), epsilon=epsilon, renormalize=renormalize)
        callback.on_train_begin(ARGS, _state(), TrainerControl(), model=model)
        callback.on_step_begin(ARGS, _state(0), TrainerControl(), model=model)
        _, weights_TK, _ = router(hidden_TD)
        kept_TK = weights_TK > epsilon
        assert (kept_TK.sum(-1) == 2).all(), (epsilon, renormalize)
        assert (weights_TK[~kept_TK] == epsilon).all(), (epsilon, renormalize)
        kept_mass_T = (weights_TK * kept_TK).sum(-1)
        if renormalize:  # the 2 kept weights carry the whole k_pre mass
            torch.testing.assert_close(kept_mass_T, k_pre_weights_TK.sum(-1))
        else:  # the 2 kept weights are the router's own, unscaled
            torch.testing.assert_close(weights_TK[kept_TK], k_pre_weights_TK[kept_TK])
            assert (kept_mass_T < k_pre_weights_TK.sum(-1)).all()
        callback.on_train_end(ARGS, _state(1), TrainerControl(), model=model)


def test_the_progress_bar_shows_step_k_and_loss_on_rank_zero_only():
    phds_callback = PHDSCallback(PHDSSchedule.fixed(3))
    phds_callback.current_k = 3
    bar = RichProgressCallback(phds_callback)
    bar.on_train_begin(ARGS, _state(0, 5), TrainerControl())
    bar.on_log(ARGS, _state(1, 5), TrainerControl(), logs={"loss": 2.5})
    bar.on_step_end(ARGS, _state(2, 5), TrainerControl())
    task = bar.progress.tasks[0]
    assert task.completed == 2 and task.total == 5
    assert task.fields["k"] == 3 and task.fields["loss"] == "2.5000"
    bar.on_train_end(ARGS, _state(5, 5), TrainerControl())
    assert bar.progress is None

    phds_callback.current_k = {0: 2, 1: 3}  # layer-wise sampling: the bar shows the mean over layers
    per_layer = RichProgressCallback(phds_callback)
    per_layer.on_train_begin(ARGS, _state(0, 5), TrainerControl())
    per_layer.on_step_end(ARGS, _state(1, 5), TrainerControl())
    assert per_layer.progress.tasks[0].fields["k"] == "2.50 (layer mean)"
    per_layer.close()

    other_rank = RichProgressCallback(phds_callback)
    other_rank.on_train_begin(ARGS, _state(0, 5, rank_zero=False), TrainerControl())
    other_rank.on_step_end(ARGS, _state(1, 5, rank_zero=False), TrainerControl())
    assert other_rank.progress is None


def test_best_checkpoint_saves_only_on_improvement_and_resumes_its_best_from_the_log_history():
    saved = []
    callback = BestCheckpointCallback([2, 4], lambda model, step, losses: saved.append((step, losses)))
    callback.on_train_begin(ARGS, _state(), TrainerControl())
    for step, score in ((2, 3.0), (4, 2.0), (6, 2.5)):
        metrics = {"eval_loss": score, "eval_loss_k2": score + 0.1, "eval_loss_k4": score}
        callback.on_evaluate(ARGS, _state(step), TrainerControl(), metrics=metrics, model=None)
    assert [s for s, _ in saved] == [2, 4]
    assert callback.best_step == 4 and callback.best_losses == {2: 2.1, 4: 2.0}

    resumed = BestCheckpointCallback([2, 4], lambda model, step, losses: saved.append((step, losses)))
    history = [
        {"eval_loss": 3.0, "eval_loss_k2": 3.1, "eval_loss_k4": 3.0, "step": 2},
        {"eval_loss": 2.0, "eval_loss_k2": 2.1, "eval_loss_k4": 2.0, "step": 4},
    ]
    resumed.on_train_begin(ARGS, _state(5, log_history=history), TrainerControl())
    assert resumed.best_step == 4 and resumed.best_losses == {2: 2.1, 4: 2.0}
    resumed.on_evaluate(ARGS, _state(6), TrainerControl(), metrics={"eval_loss": 2.5}, model=None)
    assert len(saved) == 2  # not better than the checkpoint already on disk
