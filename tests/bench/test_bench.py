"""`phds bench` runs end to end on a tiny model, reports every section, checks its configuration and the project's
targets."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import phds
import phds.bench.run as bench_run
from phds.bench import BenchConfig, bench, build_model, check_targets, markdown, run_summary
from phds.bench.measure import batch_floor_seconds, floor_seconds
from phds.cli import app


def test_bench_reports_decode_prefill_mixed_and_train_with_identical_mixed_outputs():
    config = BenchConfig(
        tiny_config="olmoe:num_experts=8",
        ks=[1, 4],
        batches=[1, 2],
        prompt_len=6,
        new_tokens=3,
        repeats=1,
        stock=["grouped_mm"],
        train=True,
        train_batch=2,
        train_seq=8,
    )
    results = bench(config)
    assert [(row["k"], row["batch"]) for row in results["decode"]] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    assert all(row["floor_ms"] > 0 for row in results["decode"] if row["batch"] == 1)
    assert results["prefill"][0]["tokens"] == 6
    assert results["mixed"]["outputs_identical"] is True
    assert results["mixed"]["ks"] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert results["mixed"]["distinct_experts_per_step"] == 2 * 8  # the k=8 rows use all 8 experts of both layers
    assert results["mixed"]["decode_tokens"] == 8 * 2
    assert results["mixed"]["floor_bound"] > 1  # the shared weights are read once for 8 rows
    assert {row["k"] for row in results["train"]} == {1, 4}
    assert "targets" not in results and "goals" not in results  # figures only; targets are checked apart
    targets = check_targets(results)
    assert targets["dial_payoff"]["met"] in (True, False) and "train_not_slower_than_grouped_mm" in targets
    rendered = markdown({**results, "targets": targets})  # what docs/performance.md's tables come from
    separators = [line for line in rendered.splitlines() if line.startswith("|---|")]
    assert len(separators) == 4  # decode, prefill, mixed and training tables
    assert "| decode |" in rendered and "| 4 | 2 |" in rendered and "Targets as checked" in rendered


def test_bench_compile_compiles_each_shape_untimed_before_timing_it(monkeypatch):
    calls = []

    def fake_compile(function, **kwargs):  # a real compile costs ~15 s per shape (test_engine.py runs one)
        return lambda **inputs: (calls.append(phds.get_k(model)), function(**inputs))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = build_model(BenchConfig(tiny_config="olmoe:num_experts=8"))
    monkeypatch.setattr(bench_run, "build_model", lambda config: model)
    config = BenchConfig(ks=[2], prompt_len=4, new_tokens=3, repeats=1, stock=["grouped_mm"], compile=True)
    results = bench(config)
    assert results["compile_s"] > 0 and results["mixed"]["compile_s"] > 0
    assert "engine compiled" in run_summary(results)
    assert results["mixed"]["outputs_identical"] is True
    # warm-up (2 steps) then the timed run (2 steps) at k=2, then the mixed row's warm-ups: the batch, each k alone
    assert calls[:4] == [2] * 4 and len(calls) > 4


def test_bench_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--tiny-config",
            "mixtral:num_local_experts=6",
            "--k",
            "2",
            "--prompt-len",
            "4",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--stock",
            "grouped_mm",
            "--no-mixed",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["decode"][0]["k"] == 2 and "decode_within_2x_floor" in written["targets"]
    assert "project targets" in result.output and "issue" not in result.output


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(new_tokens=1), "new_tokens"),
        (dict(ks=[]), "ks"),
        (dict(stock=["fast"]), "stock"),
        (dict(model="x"), "exactly one"),
        (dict(dtype="bf16"), "dtype"),
    ],
)
def test_bad_bench_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_presets_are_named_after_their_shape_and_a_misspelt_preset_is_rejected():
    assert build_model(BenchConfig(tiny_config="olmoe-shape-small-overhead-only")).config.hidden_size == 64
    with pytest.raises(ValueError, match="olmoe-shape-small"):
        build_model(BenchConfig(tiny_config="issue7"))


def test_tiny_config_fields_are_parsed_and_k_above_experts_is_rejected():
    assert build_model(BenchConfig(tiny_config="olmoe:num_experts=4,num_experts_per_tok=2")).config.num_experts == 4
    result = CliRunner().invoke(app, ["bench", "--tiny-config", "olmoe:num_experts=6", "--k", "9"])
    assert result.exit_code == 2 and "ks" in result.output


def test_batch_floor_reads_the_shared_weights_once_and_each_distinct_expert_once():
    model = build_model(BenchConfig(tiny_config="olmoe:num_experts=8"))
    layers = model.config.num_hidden_layers
    bandwidth = 1e9
    # one expert per layer is a k=1 token, every expert of every layer is a token at k = all experts
    assert batch_floor_seconds(model, layers, bandwidth) == pytest.approx(floor_seconds(model, 1, bandwidth))
    assert batch_floor_seconds(model, layers * 8, bandwidth) == pytest.approx(floor_seconds(model, 8, bandwidth))
    assert batch_floor_seconds(model, layers * 3, bandwidth) == pytest.approx(floor_seconds(model, 3, bandwidth))


class _Float32Allocations(TorchDispatchMode):
    """Records every float32 tensor of at least 4096 elements that any op creates (buffers such as RoPE's
    frequencies are smaller)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.numel() >= 4096:
                self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_random_model_is_built_in_its_dtype_without_a_float32_copy(dtype):
    tiny = "olmoe:num_experts=8,hidden_size=64,intermediate_size=64,vocab_size=512"
    with _Float32Allocations() as allocations:
        model = build_model(BenchConfig(tiny_config=tiny, dtype=dtype))
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert allocations.shapes == []
    assert all(p.std() > 0 for p in model.parameters() if p.dim() > 1)  # initialised from the seed, in place
    with _Float32Allocations() as allocations:  # the recorder sees a float32 build's weights
        build_model(BenchConfig(tiny_config=tiny))
    assert (8, 2 * 64, 64) in allocations.shapes


def test_the_olmoe_1b_7b_shape_preset_is_bf16_at_olmoe_1b_7b_layer_shapes():
    with torch.device("meta"):  # shapes and dtypes only: no 7 GB allocated
        model = build_model(BenchConfig(tiny_config="olmoe-1b-7b-shape"))
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (2048, 16, 8)
    assert (config.num_experts, config.intermediate_size, config.num_experts_per_tok) == (64, 1024, 8)
    assert config.vocab_size == 50304 and config.norm_topk_prob is False
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.56e9, rel=0.01)
    with torch.device("meta"):
        assert next(build_model(BenchConfig(tiny_config="olmoe-1b-7b-shape", dtype="float32")).parameters()).dtype == (
            torch.float32
        )
