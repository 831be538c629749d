"""`phds export`: a plain checkpoint at one k that stock transformers loads and runs exactly as the dialled model."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import transformers
from typer.testing import CliRunner

import phds
from phds.cli import app
from phds.serving import export, vllm_overrides

runner = CliRunner()


def test_stock_from_pretrained_of_the_export_equals_the_dialled_model(checkpoint, tmp_path):
    out = export(checkpoint, 2, tmp_path / "k2")
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    dialled, _ = phds.load(checkpoint, k=2, device="cpu")
    at_k4, _ = phds.load(checkpoint, k=4, device="cpu")
    input_ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported_logits = stock(input_ids).logits
        torch.testing.assert_close(exported_logits, dialled(input_ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(exported_logits, at_k4(input_ids).logits, atol=1e-3)  # k really changed
    assert stock.config.num_experts_per_tok == 2
    assert transformers.AutoTokenizer.from_pretrained(out)("ab").input_ids == phds.tiny_tokenizer()("ab").input_ids
    sidecar = phds.read_sidecar(out)
    assert sidecar.method == "base" and sidecar.ks == [2] and sidecar.made_by["source_ks"] == [1, 2, 4]


def test_export_cli_prints_the_equivalent_vllm_overrides_line(checkpoint, tmp_path):
    result = runner.invoke(app, ["export", checkpoint, str(tmp_path / "k1"), "--k", "1"])
    assert result.exit_code == 0, result.output
    assert vllm_overrides(1) == """--hf-overrides '{"num_experts_per_tok": 1}'"""
    assert vllm_overrides(1) in result.output
    assert (tmp_path / "k1" / "model.safetensors").is_file()


def test_export_refuses_a_k_above_the_expert_count_and_an_existing_directory(checkpoint, tmp_path):
    result = runner.invoke(app, ["export", checkpoint, str(tmp_path / "k9"), "--k", "9"])
    assert result.exit_code == 2 and "k=9" in result.output
    assert not (tmp_path / "k9").exists()
    (tmp_path / "taken").mkdir()
    result = runner.invoke(app, ["export", checkpoint, str(tmp_path / "taken"), "--k", "2"])
    assert result.exit_code == 2 and "overwrite" in result.output


def test_serve_cli_refuses_ks_the_model_cannot_run_before_serving(checkpoint):
    result = runner.invoke(app, ["serve", checkpoint, "--k-set", "1,9", "--port", "0"])
    assert result.exit_code == 2 and "k_set" in result.output and "9" in result.output
    result = runner.invoke(app, ["serve", checkpoint, "--k-set", "1,2", "--default-k", "4"])
    assert result.exit_code == 2 and "default_k" in result.output


def test_export_writes_a_0755_folder_and_an_overwrite_that_fails_leaves_the_previous_export(
    checkpoint, tmp_path, monkeypatch
):
    out = export(checkpoint, 2, tmp_path / "k2")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        export(checkpoint, 1, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2"]  # no staging folder left behind

    monkeypatch.undo()
    export(checkpoint, 1, out, overwrite=True)
    assert phds.read_sidecar(out).ks == [1] and stat.S_IMODE(os.stat(out).st_mode) == 0o755
