"""PHDSConfig: a TrainingArguments with the PHDS fields, validated before any work."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from phds.training import PHDSConfig


def test_config_defaults_suit_a_cpu_and_keep_the_sft_recipe():
    config = PHDSConfig(output_dir="out")
    assert config.ks is None and config.anchor_fraction == 0.06 and config.select_by == "k_pre"
    assert config.k_sampling == "global"  # one k per step for the whole model, as the paper
    assert config.bf16 is False  # no CUDA here
    assert config.method == "phds"
    assert PHDSConfig(output_dir="out", fixed_k=2).method == "oracle"


def test_every_phds_field_has_help_for_the_argument_parser():
    fields = PHDSConfig.__dataclass_fields__
    for name in (
        "ks",
        "anchor_k",
        "anchor_fraction",
        "k_weights",
        "schedule_seed",
        "fixed_k",
        "k_sampling",
        "epsilon",
        "renormalize",
        "aux_loss_coef",
        "select_by",
        "lora",
        "lora_target_parameters",
        "train_router",
        "eval_fraction",
        "prompt_column",
    ):
        assert fields[name].metadata.get("help"), name
    (config,) = HfArgumentParser(PHDSConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--ks", "2", "3", "4", "--anchor_k", "2", "--select_by", "mean", "--k_sampling", "layer"]
    )
    assert config.ks == [2, 3, 4] and config.anchor_k == 2 and config.select_by == "mean"
    assert config.k_sampling == "layer"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(ks=[0, 2]), "ks"),
        (dict(ks=[2, 2]), "ks"),
        (dict(ks=[2, 3], anchor_k=4), "anchor_k"),
        (dict(ks=[2, 3], fixed_k=2), "fixed_k"),
        (dict(fixed_k=2, k_weights=[1.0]), "k_weights"),
        (dict(k_sampling="token"), "`k_sampling` must be one of \\['global', 'layer'\\], got k_sampling='token'"),
        (dict(fixed_k=2, k_sampling="layer"), "`k_sampling`='layer' has no meaning for a fixed-k oracle"),
        (dict(anchor_fraction=2.0), "anchor_fraction"),
        (dict(ks=[2, 3], k_weights=[1.0]), "k_weights"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(select_by="median"), "select_by"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(save_adapter=True), "save_adapter"),
        (dict(aux_loss_coef=0.1, router_aux_loss_coef=0.2), "aux_loss_coef"),
        (dict(max_steps=0), "max_steps"),
        (dict(max_steps=-2), "max_steps"),
        (dict(num_train_epochs=0.0), "num_train_epochs"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
        (dict(per_device_eval_batch_size=0), "per_device_eval_batch_size"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(max_length=0), "max_length"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(save_steps=0), "save_steps"),
    ],
)
def test_bad_fields_raise_a_value_error_naming_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PHDSConfig(output_dir="out", **kwargs)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=r"`output_dir`=.*taken is a file"):
        PHDSConfig(output_dir=str(path))
