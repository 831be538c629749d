"""Loading and saving: a PHDS checkpoint is a plain HF checkpoint plus phds.json."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

import phds
from phds.loading import sidecar_of


def _save_tiny(path, arch="olmoe", sidecar=None, k=None):
    model = phds.tiny_model(arch)
    if k is not None:
        phds.set_k(model, k)
    phds.save(model, path, tokenizer=phds.tiny_tokenizer(), sidecar=sidecar)
    return model


def test_saved_checkpoint_is_plain_safetensors_with_k_pre_even_when_saved_dialled(tmp_path):
    model = _save_tiny(tmp_path / "ckpt", k=2, sidecar=phds.Sidecar(ks=[2, 3, 4], k_pre=4, default_k=2))
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in files and "phds.json" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_experts_per_tok"] == 4
    assert phds.get_k(model) == 2  # saving does not change the live model's k
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert stock.config.num_experts_per_tok == 4
    ids = torch.randint(4, 100, (1, 6))
    with phds.sparsity(model, 4), torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits)


def test_load_applies_the_sidecar_default_k_and_an_explicit_k_wins(tmp_path):
    _save_tiny(tmp_path / "ckpt", sidecar=phds.Sidecar(ks=[2, 3, 4], k_pre=4, default_k=3, method="phds", anchor_k=2))
    model, tokenizer = phds.load(tmp_path / "ckpt")
    assert phds.get_k(model) == 3
    assert sidecar_of(model).ks == [2, 3, 4] and sidecar_of(model).anchor_k == 2
    assert tokenizer.decode(tokenizer("a+b=").input_ids) == "a+b="
    model, _ = phds.load(tmp_path / "ckpt", k=2, tokenizer=False)
    assert phds.get_k(model) == 2
    assert phds.moe_layers(model)[0].k_pre == 4


def test_plain_checkpoint_loads_at_k_pre(tmp_path):
    _save_tiny(tmp_path / "plain", arch="mixtral")
    model, _ = phds.load(tmp_path / "plain", dtype="float32")
    assert phds.get_k(model) == 4 and sidecar_of(model) is None
    assert next(model.parameters()).dtype == torch.float32


def test_load_of_a_tiny_family_and_bad_names():
    model, tokenizer = phds.load("tiny:gpt_oss")
    assert type(model).__name__ == "GptOssForCausalLM" and tokenizer is not None
    with pytest.raises(ValueError, match="unknown tiny model"):
        phds.load("tiny:llama")
    with pytest.raises(ValueError, match="dtype"):
        phds.load("tiny:olmoe", dtype="float8")


def test_load_refuses_a_file_and_a_missing_directory_fails_cleanly(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint directory"):
        phds.load(tmp_path / "weights.bin")
    with pytest.raises(OSError):
        phds.load(tmp_path / "missing")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    _save_tiny(target, sidecar=phds.Sidecar(ks=[4], k_pre=4, method="oracle"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model = phds.tiny_model("olmoe", seed=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        phds.save(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_sidecar_validates_and_round_trips(tmp_path):
    sidecar = phds.Sidecar(ks=[4, 2, 3], k_pre=4, anchor_k=2, made_by={"steps": 10}, validation_loss={"2": 1.5})
    assert sidecar.ks == [2, 3, 4] and sidecar.default_k == 4
    phds.write_sidecar(tmp_path, sidecar)
    assert phds.read_sidecar(tmp_path) == sidecar
    with pytest.raises(ValueError, match="default_k"):
        phds.Sidecar(ks=[2, 3], k_pre=4, default_k=4)
    with pytest.raises(ValueError, match="anchor_k"):
        phds.Sidecar(ks=[2, 3], k_pre=4, anchor_k=1)
    with pytest.raises(ValueError, match="fixed k"):
        phds.Sidecar(ks=[2, 3], k_pre=4, method="oracle")
    (tmp_path / "phds.json").write_text('{"ks": [2], "k_pre": 4, "surprise": 1}')
    with pytest.raises(ValueError, match="unknown fields"):
        phds.read_sidecar(tmp_path)
    (tmp_path / "phds.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        phds.read_sidecar(tmp_path)


def test_tiny_models_are_deterministic_and_configurable():
    a, b = phds.tiny_model("olmoe", seed=3), phds.tiny_model("olmoe", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert phds.tiny_model("olmoe", num_experts_per_tok=2).config.num_experts_per_tok == 2
    with pytest.raises(ValueError, match="arch"):
        phds.tiny_model("llama")


def test_saved_checkpoint_folder_has_ordinary_permissions(tmp_path):
    import os

    _save_tiny(tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"ks": "2,4", "k_pre": 4}, "ks"),
        ({"ks": [2, 2, 4], "k_pre": 4}, "ks"),
        ({"ks": [2, True], "k_pre": 4}, "ks"),
        ({"ks": [2, 4], "k_pre": "4"}, "k_pre"),
        ({"ks": [2, 4], "k_pre": 4, "default_k": 3}, "default_k"),
        ({"ks": [2, 4], "k_pre": 4, "method": "magic"}, "method"),
        ({"ks": [2, 4], "k_pre": 4, "made_by": ["x"]}, "made_by"),
        ({"ks": [2, 4], "k_pre": 4, "validation_loss": {"two": 1.0}}, "validation_loss"),
        ({"ks": [2, 4], "k_pre": 4, "format_version": 2}, "format_version"),
        ({"ks": [2, 4], "k_pre": 4, "format_version": "1"}, "format_version"),
        ({"ks": [2, 4], "k_pre": 4, "format_version": 1.0}, "format_version"),
        ({"ks": [2, 4], "k_pre": 4, "default_k": 2.0}, "default_k"),
        ({"ks": [2, 4], "k_pre": 4, "anchor_k": 2.0}, "anchor_k"),
        ({"ks": [2, 4], "k_pre": 4, "method": ["phds"]}, "method"),
        ({"ks": [2, 4], "k_pre": 4.0}, "k_pre"),
        ({"k_pre": 4}, "ks"),
    ],
)
def test_a_bad_sidecar_file_is_an_error_naming_the_file_and_the_field(tmp_path, fields, field):
    (tmp_path / "phds.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=field) as error:
        phds.read_sidecar(tmp_path)
    assert str(tmp_path / "phds.json") in str(error.value)


def test_loading_refuses_a_sidecar_that_does_not_fit_the_model(tmp_path):
    _save_tiny(tmp_path / "too_many", sidecar=phds.Sidecar(ks=[2, 4, 9], k_pre=4))  # the tiny OLMoE has 8 experts
    with pytest.raises(ValueError, match=r"phds\.json.*`ks`.*\(8\)"):
        phds.load(tmp_path / "too_many", device="cpu")
    _save_tiny(tmp_path / "other_k_pre", sidecar=phds.Sidecar(ks=[2], k_pre=2))
    with pytest.raises(ValueError, match=r"phds\.json.*`k_pre`=2"):
        phds.load(tmp_path / "other_k_pre", device="cpu")


def test_the_declared_ks_rules_live_in_one_place():
    from phds.sidecar import check_ks, default_k

    assert check_ks([4, 2, 3], num_experts=8) == [2, 3, 4]
    with pytest.raises(ValueError, match=r"`eval_ks`.*\[9\]"):
        check_ks([2, 9], name="eval_ks", num_experts=8)
    assert default_k([2, 3, 4], 4) == 4 and default_k([1, 2], 4) == 2


def test_loading_does_not_import_the_engine_but_finds_it_through_the_registry():
    import ast
    import inspect

    import phds.loading

    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(inspect.getsource(phds.loading)))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not any(name and name.startswith("phds.engine") for name in imported)
    model, _ = phds.load("tiny:olmoe", experts_implementation="phds", tokenizer=False, device="cpu")
    assert model.config._experts_implementation == "phds"


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("./no/such/model", FileNotFoundError, "no such directory: ./no/such/model"),
        ("/no-such-dir-phds", FileNotFoundError, "no such directory"),
        ("not a hub name!", FileNotFoundError, "not a valid hub name"),
    ],
)
def test_a_missing_local_model_is_one_clear_error_before_any_hub_call(name, error, message, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(error, match=message):
        phds.load(name)


def test_an_uncached_hub_name_offline_is_refused_at_once(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(ValueError, match="not in the local cache while offline"):
        phds.load("nobody-phds/never-published-model")


def test_an_unreachable_hub_is_said_at_once(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="hub cannot be reached"):
        phds.load("nobody-phds/never-published-model")


def test_a_folder_without_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        phds.load(tmp_path)


@pytest.mark.parametrize(
    ("device", "message"),
    [("banana", "`device` must be"), ("cuda", "CUDA is not available"), ("cuda:99", "CUDA")],
)
def test_an_unknown_or_absent_device_is_refused_before_loading(device, message):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=message):
        phds.load("tiny:olmoe", device=device)


def test_a_sidecar_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "phds.json").write_bytes(b'{"ks": [2], "k_pre": 4, "method": "\xff"}')
    with pytest.raises(ValueError, match=r"phds\.json is not valid UTF-8"):
        phds.read_sidecar(tmp_path)


# Every reader of a checkpoint goes through the one validator: `phds.load`, `phds eval`, `phds serve`, lm-eval.
BAD_SIDECARS = {
    "k_pre": ({"ks": [2], "k_pre": 2}, r"`k_pre`=2 does not match the model"),
    "format_version": ({"ks": [2, 4], "k_pre": 4, "format_version": 7}, "`format_version` 7"),
    "types": ({"ks": [2, 4], "k_pre": 4, "default_k": "4"}, "`default_k`"),
    "k_above_experts": ({"ks": [2, 9], "k_pre": 4}, r"`ks`.*\(8\).*\[9\] too large"),
}


@pytest.fixture(params=sorted(BAD_SIDECARS))
def bad_checkpoint(request, tmp_path):
    fields, message = BAD_SIDECARS[request.param]
    _save_tiny(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "phds.json").write_text(json.dumps(fields))
    return tmp_path / "ckpt", message


def test_phds_load_refuses_each_bad_sidecar_naming_file_and_field(bad_checkpoint):
    path, message = bad_checkpoint
    with pytest.raises(ValueError, match=message) as error:
        phds.load(path, device="cpu")
    assert str(path / "phds.json") in str(error.value)


def test_phds_eval_and_serve_refuse_each_bad_sidecar_in_one_line(bad_checkpoint, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import phds.serving.server
    from phds.cli import app

    path, message = bad_checkpoint
    monkeypatch.setattr(phds.serving.server, "serve", lambda *a, **k: pytest.fail("served a bad checkpoint"))
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    for args in (
        ["eval", str(path), "--tasks", str(tasks), "--out", str(tmp_path / "o"), "--device", "cpu"],
        ["serve", str(path), "--device", "cpu"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error:") and "phds.json" in last and re.search(message, last), result.output
    assert not (tmp_path / "o").exists()
