"""Saving the best checkpoint is atomic, and the run's own files (checkpoints, log) survive each replacement."""

from __future__ import annotations

import pytest
import torch
import transformers

import phds
from phds.sidecar import Sidecar
from phds.training.saving import save_checkpoint

SAVED_CONFIG = {"output_router_logits": False}


def _weights(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


class _CrashingTokenizer:
    """Saving it writes half a file and dies, as a kill mid-save would."""

    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{half a fi")
        raise KeyboardInterrupt("killed mid-save")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_and_the_run_files_intact(tmp_path):
    out = tmp_path / "out"
    first, second = phds.tiny_model("olmoe", seed=0), phds.tiny_model("olmoe", seed=1)
    tokenizer = phds.tiny_tokenizer()
    save_checkpoint(first, out, tokenizer, Sidecar(ks=[2, 4], k_pre=4), SAVED_CONFIG)
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "phds_log.jsonl").write_text('{"event": "step", "step": 0, "k": 2}\n')

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(second, out, _CrashingTokenizer(), Sidecar(ks=[2, 4], k_pre=4), SAVED_CONFIG)
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, first.state_dict()[name])
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and (out / "phds_log.jsonl").is_file()
    assert (out / "tokenizer.json").read_text().startswith("{") and len((out / "tokenizer.json").read_text()) > 20

    save_checkpoint(second, out, tokenizer, Sidecar(ks=[2, 4], k_pre=4, validation_loss={"2": 1.0}), SAVED_CONFIG)
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, second.state_dict()[name])
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    assert (out / "phds_log.jsonl").read_text().startswith('{"event": "step"')
    assert phds.read_sidecar(out).validation_loss == {"2": 1.0}
    assert not list(tmp_path.glob(".out.*"))  # no staging or old directories left behind


def test_saving_writes_the_users_config_not_the_training_switches(tmp_path):
    model = phds.tiny_model("olmoe")
    model.config.output_router_logits = True  # what SFTTrainer sets to compute the aux loss
    phds.set_k(model, 2)
    save_checkpoint(model, tmp_path / "out", phds.tiny_tokenizer(), Sidecar(ks=[2, 4], k_pre=4), SAVED_CONFIG)
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert saved.output_router_logits is False and saved.num_experts_per_tok == 4
    assert model.config.output_router_logits is True and phds.get_k(model) == 2  # the training model is untouched


def test_a_gathered_state_dict_is_written_as_the_checkpoint(tmp_path):
    # the FSDP path: every rank gathers the full state dict, rank 0 writes it instead of the (sharded) parameters
    model, trained = phds.tiny_model("olmoe", seed=0), phds.tiny_model("olmoe", seed=1)
    save_checkpoint(
        model, tmp_path / "out", phds.tiny_tokenizer(), Sidecar(ks=[2, 4], k_pre=4), SAVED_CONFIG, trained.state_dict()
    )
    for name, value in _weights(tmp_path / "out").items():
        torch.testing.assert_close(value, trained.state_dict()[name])
    assert phds.read_sidecar(tmp_path / "out").ks == [2, 4]
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_lora_under_fsdp_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from phds.training import train
    from tests.training.conftest import ADDITION, fast_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP"):
        train("tiny:olmoe", fast_config(tmp_path / "o", lora=True), train_data=ADDITION)
    assert not (tmp_path / "o").exists()


def test_a_crash_between_the_renames_is_finished_with_the_run_files_by_the_next_run(tmp_path, monkeypatch):
    from phds import checkpoint
    from phds.training.saving import RUN_ENTRIES

    out = tmp_path / "out"
    first, second = phds.tiny_model("olmoe", seed=0), phds.tiny_model("olmoe", seed=1)
    save_checkpoint(first, out, phds.tiny_tokenizer(), Sidecar(ks=[2, 4], k_pre=4), SAVED_CONFIG)
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "phds_log.jsonl").write_text('{"event": "step", "step": 0, "k": 2}\n')
    replace = checkpoint.os.replace

    def killed_before_the_last_rename(source, destination):
        if str(source).endswith(".out.staging"):
            raise KeyboardInterrupt("killed between the renames")
        replace(source, destination)

    monkeypatch.setattr(checkpoint.os, "replace", killed_before_the_last_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(second, out, phds.tiny_tokenizer(), Sidecar(ks=[2, 4], k_pre=4), SAVED_CONFIG)
    monkeypatch.undo()
    assert not out.exists()  # the state a kill leaves: the old and the staged checkpoint beside each other

    checkpoint.recover(out, carry=RUN_ENTRIES)  # what the next `train` on this output_dir does first
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, second.state_dict()[name])
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and (out / "phds_log.jsonl").is_file()
    assert not list(tmp_path.glob(".out.*"))
