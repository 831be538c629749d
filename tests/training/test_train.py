"""End-to-end PHDS and oracle fine-tunes of tiny MoE models on CPU."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from transformers import TrainerCallback

import phds
from phds.schedule import PHDSSchedule
from phds.training import PHDSConfig, read_log, train
from tests.training.conftest import fast_config


def _max_weight_change(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    b = model_b.state_dict()
    return max((value - b[name]).abs().max().item() for name, value in model_a.state_dict().items())


def test_phds_run_saves_a_plain_checkpoint_that_stock_from_pretrained_loads(tmp_path, addition_rows):
    out = tmp_path / "phds"
    result = train("tiny:olmoe", fast_config(out, ks=[2, 3, 4], anchor_k=2), train_data=addition_rows)

    assert result.method == "phds" and result.ks == [2, 3, 4]
    assert len(result.k_history) == 6 and set(result.k_history) <= {2, 3, 4}
    assert result.k_history == PHDSSchedule(ks=[2, 3, 4], anchor_k=2, seed=0).sequence(6)
    assert set(result.validation_loss) == {2, 3, 4}
    assert result.best_step in (3, 6)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_experts_per_tok == 4  # k_pre unchanged in the checkpoint
    assert not loaded.config.output_router_logits  # training's aux-loss switch is not saved
    assert _max_weight_change(loaded, phds.tiny_model("olmoe")) > 1e-4  # it trained

    sidecar = phds.read_sidecar(out)
    assert sidecar.method == "phds" and sidecar.ks == [2, 3, 4] and sidecar.anchor_k == 2 and sidecar.k_pre == 4
    assert {int(k): v for k, v in sidecar.validation_loss.items()} == pytest.approx(result.validation_loss)
    assert sidecar.made_by["best_step"] == result.best_step
    assert sidecar.made_by["schedule"]["ks"] == [2, 3, 4] and sidecar.made_by["seed"] == 0
    assert sidecar.made_by["k_sampling"] == "global"
    assert sidecar.made_by["steps"] == 6

    model, tokenizer = phds.load(out, device="cpu")
    assert phds.get_k(model) == 4 and tokenizer is not None


def test_the_log_has_the_k_of_every_step_and_the_validation_loss_at_every_k(tmp_path, addition_rows):
    out = tmp_path / "run"
    result = train("tiny:qwen2_moe", fast_config(out, ks=[2, 4]), train_data=addition_rows)
    entries = read_log(out)
    assert [e["k"] for e in entries if e["event"] == "step"] == result.k_history
    evals = [e for e in entries if e["event"] == "log" and "eval_loss_k2" in e]
    assert [e["step"] for e in evals] == [3, 6]
    assert all("eval_loss_k4" in e for e in evals)
    train_logs = [e for e in entries if e["event"] == "log" and "loss" in e]
    assert train_logs and all(e["k"] in (2, 4) for e in train_logs)
    assert all("aux_loss" in e for e in train_logs)  # Qwen2-MoE's own coefficient, at the dialled k


def test_the_saved_checkpoint_is_the_one_with_the_best_selection_loss(tmp_path, addition_rows):
    out = tmp_path / "mean"
    # a learning rate so high that later steps get worse, so the best checkpoint is not simply the last one
    config = fast_config(out, ks=[2, 3, 4], select_by="mean", learning_rate=0.3, max_steps=4, eval_steps=1)
    result = train("tiny:olmoe", config, train_data=addition_rows)
    evals = [e for e in read_log(out) if "eval_loss_k2" in e]
    means = {e["step"]: (e["eval_loss_k2"] + e["eval_loss_k3"] + e["eval_loss_k4"]) / 3 for e in evals}
    best = min(means, key=means.get)
    assert result.best_step == best
    assert phds.read_sidecar(out).made_by["best_step"] == best
    assert sum(result.validation_loss.values()) / 3 == pytest.approx(means[best])


def test_an_oracle_trains_at_its_fixed_k_on_every_step(tmp_path, addition_rows):
    out = tmp_path / "oracle"
    result = train("tiny:olmoe", fast_config(out, fixed_k=2, max_steps=3), train_data=addition_rows)
    assert result.method == "oracle" and result.k_history == [2] * 3
    assert set(result.validation_loss) == {2}
    sidecar = phds.read_sidecar(out)
    assert sidecar.method == "oracle" and sidecar.ks == [2] and sidecar.default_k == 2 and sidecar.anchor_k is None


class _RecordRoutedK(TrainerCallback):
    """Records the router's k at every training forward (micro-batch) of the run."""

    def __init__(self):
        self.forward_ks: list[int] = []
        self.handles = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        router = phds.moe_layers(model)[0].router
        self.handles.append(router.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output):
        if module.training:
            self.forward_ks.append(module.top_k)

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()


def test_every_micro_batch_of_a_gradient_accumulation_step_uses_the_same_k(tmp_path, addition_rows):
    recorder = _RecordRoutedK()
    config = fast_config(
        tmp_path / "ga",
        ks=[1, 2, 3, 4],
        gradient_accumulation_steps=3,
        per_device_train_batch_size=2,
        eval_strategy="no",
        eval_fraction=0.0,
    )
    result = train("tiny:olmoe", config, train_data=addition_rows, callbacks=[recorder])
    assert len(recorder.forward_ks) == 3 * 6
    per_step = [recorder.forward_ks[i : i + 3] for i in range(0, 18, 3)]
    assert all(len(set(group)) == 1 for group in per_step)
    assert [group[0] for group in per_step] == result.k_history
    assert len(set(result.k_history)) > 1  # the schedule did change k between steps


class _RecordLayerKs(TrainerCallback):
    """Records every MoE layer's routed k at every training forward (micro-batch) of the run."""

    def __init__(self):
        self.forward_ks: list[dict[int, int]] = []
        self.handles = []
        self._pending: dict[int, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.layers = phds.moe_layers(model)
        for layer in self.layers:
            self.handles.append(layer.router.register_forward_hook(self._hook(layer.index)))

    def _hook(self, index):
        def hook(module, inputs, output):
            if module.training:
                self._pending[index] = module.top_k
                if len(self._pending) == len(self.layers):  # the last MoE layer of this forward
                    self.forward_ks.append(dict(self._pending))
                    self._pending = {}

        return hook

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()


def test_layer_sampling_dials_every_layer_its_own_k_on_every_micro_batch_and_logs_and_records_it(
    tmp_path, addition_rows, caplog
):
    recorder = _RecordLayerKs()
    out = tmp_path / "layer"
    config = fast_config(
        out,
        ks=[1, 2, 3, 4],
        k_sampling="layer",
        anchor_fraction=0.25,
        max_steps=4,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        eval_strategy="no",
        eval_fraction=0.0,
        logging_steps=1,
    )
    model = phds.tiny_model("olmoe", num_hidden_layers=3)
    with caplog.at_level(logging.WARNING, logger="phds.training.train"):
        result = train(model, config, train_data=addition_rows, tokenizer=phds.tiny_tokenizer(), callbacks=[recorder])
    # OLMoE's own aux-loss coefficient is on: the run says the loss counts the step's largest k in every layer
    assert "load-balancing loss" in caplog.text and "largest k" in caplog.text
    schedule = PHDSSchedule(ks=[1, 2, 3, 4], anchor_fraction=0.25, seed=0, sampling="layer")
    expected = [schedule.ks_at(step, 4, [0, 1, 2]) for step in range(4)]
    assert result.k_history == expected
    assert expected[-1] == {0: 1, 1: 1, 2: 1}  # the anchor ramp ends with every layer at the anchor
    assert any(len(set(ks.values())) > 1 for ks in expected)  # layers differ within a step
    # two micro-batches per optimizer step, both at that step's per-layer ks
    assert recorder.forward_ks == [ks for ks in expected for _ in range(2)]

    entries = read_log(out)
    steps = [e for e in entries if e["event"] == "step"]
    assert [{int(i): k for i, k in e["layer_k"].items()} for e in steps] == expected
    assert [e["k"] for e in steps] == [sum(ks.values()) / 3 for ks in expected]
    train_logs = {e["step"]: e["k"] for e in entries if e["event"] == "log" and "loss" in e}
    assert train_logs == {step + 1: sum(ks.values()) / 3 for step, ks in enumerate(expected)}

    made_by = phds.read_sidecar(out).made_by
    assert made_by["k_sampling"] == "layer" and made_by["schedule"]["sampling"] == "layer"
    assert phds.get_k(model) == 4  # k_pre restored after training


def test_pretraining_plain_text_with_packing_works_on_a_module_built_from_config(tmp_path, text_rows):
    model = transformers.AutoModelForCausalLM.from_config(phds.tiny_config("mixtral"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    config = fast_config(tmp_path / "pre", fixed_k=4, packing=True, packing_strategy="wrapped", max_length=32)
    result = train(model, config, train_data=text_rows, tokenizer=phds.tiny_tokenizer())
    assert result.k_history == [4] * 6
    assert max((model.state_dict()[n] - v).abs().max().item() for n, v in before.items()) > 1e-4
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pre").config.num_experts_per_tok == 4


def test_chat_messages_rows_train_through_the_chat_template(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
        for a in range(16)
    ]
    result = train(
        "tiny:olmoe", fast_config(tmp_path / "chat", ks=[2, 4], max_length=32, max_steps=3), train_data=rows
    )
    assert set(result.validation_loss) == {2, 4}


def test_lora_run_saves_a_merged_checkpoint_with_trained_experts(tmp_path, addition_rows):
    out = tmp_path / "lora"
    config = fast_config(out, ks=[2, 3, 4], lora=True, lora_r=4, lora_alpha=8, save_adapter=True)
    base = phds.tiny_model("olmoe")
    result = train("tiny:olmoe", config, train_data=addition_rows)
    assert set(result.validation_loss) == {2, 3, 4}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    names = set(loaded.state_dict())
    assert not any("lora" in name for name in names)
    assert names == set(base.state_dict())
    changed = {
        name for name, value in loaded.state_dict().items() if (value - base.state_dict()[name]).abs().max() > 0
    }
    assert any(".mlp.experts." in name for name in changed)  # experts adapted through target_parameters
    assert any(".mlp.gate." in name for name in changed)  # router trained (not frozen by default)
    assert any("self_attn.q_proj" in name for name in changed)
    assert not any("embed_tokens" in name for name in changed)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in adapter["target_parameters"]


def test_a_frozen_router_stays_as_it_was(tmp_path, addition_rows):
    out = tmp_path / "frozen"
    train("tiny:olmoe", fast_config(out, ks=[2, 4], train_router=False, max_steps=3), train_data=addition_rows)
    base, loaded = phds.tiny_model("olmoe"), transformers.AutoModelForCausalLM.from_pretrained(out)
    for layer_base, layer_loaded in zip(phds.moe_layers(base), phds.moe_layers(loaded), strict=True):
        assert torch.equal(layer_base.router.weight, layer_loaded.router.weight)
    assert _max_weight_change(loaded, base) > 1e-4


def test_the_aux_loss_is_on_by_default_and_a_zero_coefficient_turns_it_off(tmp_path, addition_rows):
    # the default run of test_the_log_... logs aux_loss (OLMoE declares router_aux_loss_coef=0.01)
    out = tmp_path / "noaux"
    train("tiny:olmoe", fast_config(out, ks=[2, 4], aux_loss_coef=0.0, max_steps=2), train_data=addition_rows)
    assert not any("aux_loss" in e for e in read_log(out))
    assert PHDSConfig(output_dir="x", aux_loss_coef=0.05).router_aux_loss_coef == 0.05


class _RecordRouterPlan(TrainerCallback):
    """The routing plan (epsilon, renormalisation) the dial applied during training."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.plan = phds.moe_layers(model)[0].router._phds_plan


@pytest.mark.parametrize(("epsilon", "renormalize"), [(1e-6, None), (0.0, False)])
def test_routing_options_are_applied_in_training_and_evaluation(tmp_path, addition_rows, epsilon, renormalize):
    recorder = _RecordRouterPlan()
    config = fast_config(tmp_path / "r", ks=[2, 4], epsilon=epsilon, renormalize=renormalize, max_steps=3)
    result = train("tiny:qwen3_moe", config, train_data=addition_rows, callbacks=[recorder])
    assert set(result.validation_loss) == {2, 4}
    assert recorder.plan.epsilon == epsilon and recorder.plan.renormalize is renormalize
    assert phds.read_sidecar(tmp_path / "r").made_by["epsilon"] == epsilon


def test_gsm8k_question_answer_rows_train_from_the_shared_data_file(tmp_path, shared_data):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:2000]]
    short = [row for row in rows if len(row["question"]) + len(row["answer"]) < 230][:32]
    small = tmp_path / "gsm8k_short.jsonl"  # the tiny char-level model (256 positions) needs short rows
    small.write_text("".join(json.dumps(row) + "\n" for row in short))
    config = fast_config(
        tmp_path / "gsm8k",
        ks=[2, 4],
        prompt_column="question",
        completion_column="answer",
        max_steps=2,
        eval_steps=2,
        max_length=250,
    )
    result = train("tiny:olmoe", config, train_data=str(small))
    assert set(result.validation_loss) == {2, 4}
    assert phds.read_sidecar(tmp_path / "gsm8k").made_by["data"]["train"] == str(small)


def test_rows_cut_off_entirely_by_max_length_are_a_clear_error_that_leaves_nothing(tmp_path, addition_rows):
    rows = [{"prompt": "x" * 40 + r["prompt"], "completion": r["completion"]} for r in addition_rows]
    with pytest.raises(ValueError, match="max_length"):
        train("tiny:olmoe", fast_config(tmp_path / "cut", ks=[2, 4], max_length=16), train_data=rows)
    assert not (tmp_path / "cut").exists()


def test_a_fixed_k_run_validated_over_eval_ks_is_selected_by_their_mean(tmp_path, addition_rows):
    out = tmp_path / "sft"
    # a learning rate so high that later steps get worse, so the selected step is not simply the last one
    config = fast_config(
        out, fixed_k=4, eval_ks=[2, 3, 4], select_by="mean", learning_rate=0.3, max_steps=4, eval_steps=1
    )
    result = train("tiny:olmoe", config, train_data=addition_rows)
    assert result.k_history == [4] * 4 and result.ks == [4]
    evals = [e for e in read_log(out) if e["event"] == "log" and "eval_loss_k2" in e]
    assert [e["step"] for e in evals] == [1, 2, 3, 4] and all(
        "eval_loss_k3" in e and "eval_loss_k4" in e for e in evals
    )
    means = {e["step"]: (e["eval_loss_k2"] + e["eval_loss_k3"] + e["eval_loss_k4"]) / 3 for e in evals}
    best = min(means, key=means.get)
    assert result.best_step == best and set(result.validation_loss) == {2, 3, 4}
    sidecar = phds.read_sidecar(out)
    assert sidecar.method == "oracle" and sidecar.ks == [4] and set(sidecar.validation_loss) == {"2", "3", "4"}
    assert sidecar.made_by["eval_ks"] == [2, 3, 4] and sidecar.made_by["select_by"] == "mean"
    assert sidecar.made_by["best_step"] == best


class _KeepFinalWeights(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_select_by_final_saves_the_last_steps_model_even_when_an_earlier_step_was_better(tmp_path, addition_rows):
    out = tmp_path / "final"
    final = _KeepFinalWeights()
    config = fast_config(out, ks=[2, 4], select_by="final", learning_rate=0.3, max_steps=4, eval_steps=1)
    result = train("tiny:olmoe", config, train_data=addition_rows, callbacks=[final])
    evals = {e["step"]: e for e in read_log(out) if e["event"] == "log" and "eval_loss_k2" in e}
    assert sorted(evals) == [1, 2, 3, 4]  # validation still runs at every evaluation step
    assert min(evals, key=lambda step: evals[step]["eval_loss_k4"]) != 4  # an earlier step was better at k_pre
    assert result.best_step == 4 and result.validation_loss == pytest.approx(
        {2: evals[4]["eval_loss_k2"], 4: evals[4]["eval_loss_k4"]}
    )
    saved = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(value, final.weights[name])
    assert phds.read_sidecar(out).made_by["select_by"] == "final"
    assert phds.read_sidecar(out).made_by["best_step"] == 4


def test_eval_ks_outside_the_models_experts_or_without_the_selection_k_are_refused(tmp_path, addition_rows):
    with pytest.raises(ValueError, match="eval_ks"):
        train("tiny:olmoe", fast_config(tmp_path / "a", ks=[2, 4], eval_ks=[2, 99]), train_data=addition_rows)
    with pytest.raises(ValueError, match="eval_ks"):
        train("tiny:olmoe", fast_config(tmp_path / "b", ks=[2, 4], eval_ks=[2, 3]), train_data=addition_rows)
    with pytest.raises(ValueError, match="eval_ks"):
        PHDSConfig(output_dir="x", eval_ks=[2, 2])
