"""The "phds" experts under torch.compile with no preparation: a full graph, compiled generate() with every output,
and no recompile when a static-cache prompt gets shorter -- on every family, against the eager experts.

Dynamo is what decides graphs and recompiles, so most checks count the graphs it hands a recording backend (fast);
one slow test runs Inductor's code end to end.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import phds
import phds.engine  # noqa: F401  (registers the "phds" experts implementation)

# Compiling costs seconds per family: OLMoE runs in the default suite, the other five with the slow tests.
SIX = [
    pytest.param(family, marks=() if family == "olmoe" else pytest.mark.slow)
    for family in ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")
]
OUTPUTS = dict(
    max_new_tokens=4,
    do_sample=False,
    pad_token_id=0,
    return_dict_in_generate=True,
    output_scores=True,
    output_logits=True,
    output_hidden_states=True,
    output_attentions=True,
)


class RecordingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs. (A function, not a
    callable object: generate() copies its compile config, and a copied object would count elsewhere.)"""

    def __init__(self) -> None:
        self.graph_modules: list = []

        def backend(graph_module, example_inputs):
            self.graph_modules.append(graph_module)
            return graph_module.forward

        self.backend = backend

    @property
    def graphs(self) -> int:
        return len(self.graph_modules)


def _model(family: str):
    # GPT-OSS's sliding-window cache layers guard on their fill level (a recompile per step with any experts
    # implementation); with full attention the check isolates the experts
    extra = {"layer_types": ["full_attention"] * 2} if family == "gpt_oss" else {}
    return phds.tiny_model(family, attn_implementation="eager", **extra)


def _compile_config(backend) -> CompileConfig:
    config = CompileConfig(backend=backend, fullgraph=True, mode=None, dynamic=False)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told
    return config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", SIX)
def test_a_full_graph_compiled_forward_equals_the_eager_experts(family):
    model = _model(family)
    input_ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    per_row = torch.tensor([1, 3])
    with torch.no_grad():
        expected = model(input_ids).logits
        with phds.sparsity(model, per_row):
            expected_per_row = model(input_ids).logits
        model.set_experts_implementation("phds")
        backend = RecordingBackend()
        compiled = torch.compile(model, fullgraph=True, backend=backend.backend)
        torch.testing.assert_close(compiled(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
        with phds.sparsity(model, per_row):  # the dial's per-row hook is traced into the same kind of graph
            torch.testing.assert_close(compiled(input_ids).logits, expected_per_row, rtol=1e-5, atol=1e-5)
    assert backend.graphs >= 1


@pytest.mark.parametrize("family", SIX)
def test_compiled_generate_with_every_output_matches_eager_and_a_shorter_prompt_needs_no_recompile(family):
    model = _model(family)
    input_ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = model.generate(input_ids, **OUTPUTS)
    model.set_experts_implementation("phds")
    backend = RecordingBackend()
    compile_config = _compile_config(backend.backend)
    got = model.generate(input_ids, cache_implementation="static", compile_config=compile_config, **OUTPUTS)
    assert backend.graphs == 1  # the decode step, one full graph
    assert torch.equal(got.sequences, expected.sequences)
    for name in ("scores", "logits"):
        for step_got, step_expected in zip(getattr(got, name), getattr(expected, name), strict=True):
            torch.testing.assert_close(step_got, step_expected, rtol=1e-5, atol=1e-5)
    assert len(got.hidden_states) == len(got.attentions) == OUTPUTS["max_new_tokens"]
    torch.testing.assert_close(got.hidden_states[-1][-1], expected.hidden_states[-1][-1], rtol=1e-5, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):
        shorter = model.generate(
            input_ids[:, :4], cache_implementation="static", compile_config=compile_config, **OUTPUTS
        )
    assert backend.graphs == 1 and shorter.sequences.shape == (2, 8)


def test_prepared_compile_still_skips_dropped_slots_in_batches():
    from phds.engine.experts import prepare_compile

    model = _model("olmoe")
    input_ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), phds.sparsity(model, torch.tensor([1, 4])):
        expected = model(input_ids).logits
        model.set_experts_implementation("phds")
        prepare_compile(model)
        backend = RecordingBackend()
        compiled = torch.compile(model, fullgraph=True, backend=backend.backend)
        torch.testing.assert_close(compiled(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert "sparse_experts" in backend.graph_modules[0].code  # the opaque op that computes only the kept pairs


@pytest.mark.slow
def test_inductor_compiled_generate_matches_eager():
    model = _model("qwen3_moe")
    input_ids = torch.randint(4, 100, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = model.generate(input_ids, **OUTPUTS)
    model.set_experts_implementation("phds")
    got = model.generate(
        input_ids, cache_implementation="static", compile_config=_compile_config("inductor"), **OUTPUTS
    )
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(step_got, step_expected, rtol=1e-4, atol=1e-4)
