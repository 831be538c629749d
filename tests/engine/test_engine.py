"""The engine: greedy output equals transformers' generate at the same k, rows with mixed k join and leave."""

from __future__ import annotations

import shutil

import pytest
import torch

import phds
from phds.engine import Engine, Request, SamplingParams
from phds.engine import engine as engine_module
from phds.engine.decode_linear import DecodeLinear
from phds.engine.engine import COMPILE_OPTIONS

PROMPTS = [[1, 5, 9, 20, 33], [1, 40, 41], [1, 7, 7, 7, 8, 9, 10, 11], [1, 60]]


def _hf_greedy(model, prompt: list[int], k: int, max_new_tokens: int) -> list[int]:
    with phds.sparsity(model, k):
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_mixed_k_batch_equals_transformers_generate_at_each_k(arch):
    model = phds.tiny_model(arch)
    ks = [1, 4, 2, 3]
    engine = Engine(model, max_batch_size=3)  # 4 prompts, 3 rows: the last joins when a row frees
    outputs = engine.generate(PROMPTS, ks, SamplingParams(max_new_tokens=10))
    for prompt, k, output in zip(PROMPTS, ks, outputs, strict=True):
        assert output == _hf_greedy(model, prompt, k, 10), (arch, k)
    assert phds.get_k(model) == phds.dial.k_pre(model)  # the engine leaves the model's own dial alone


def test_a_model_with_eager_attention_decodes_as_transformers_generate_does(arch):
    # its prefill builds no 4-D mask of its own: transformers' causal mask must place the queries at the positions
    # before the new tokens (a prompt once saw its own future tokens here)
    model = phds.tiny_model(arch)
    model.set_attn_implementation("eager")
    outputs = Engine(model).generate([PROMPTS[0]], 2, SamplingParams(max_new_tokens=6))
    assert outputs == [_hf_greedy(model, PROMPTS[0], 2, 6)]


def test_rows_join_and_leave_between_steps_and_cancel_frees_a_row():
    model = phds.tiny_model("olmoe")
    engine = Engine(model, max_batch_size=2)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for name in "abc":
        engine.add(Request(request_id=name, prompt_ids=[1, 5, 6], k=2, params=params))
    first = engine.step()
    assert [e.request_id for e in first] == ["a", "b"] and engine.num_waiting() == 1
    engine.cancel("a")
    second = engine.step()
    assert ("a", None, True, "cancelled") in [(e.request_id, e.token_id, e.finished, e.finish_reason) for e in second]
    assert engine.num_running() == 2  # c took a's row
    events = []
    while engine.has_work():
        events.extend(engine.step())
    finished = {e.request_id: e.finish_reason for e in events if e.finished}
    assert finished == {"b": "length", "c": "length"}
    assert sum(e.request_id == "c" for e in first + second + events) == 5


def test_stop_tokens_end_a_request_and_are_emitted():
    model = phds.tiny_model("olmoe")
    engine = Engine(model)
    free = engine.generate([PROMPTS[0]], 2, SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    stop = free[2]
    stopped = engine.generate([PROMPTS[0]], 2, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)))[0]
    assert stopped == free[: free.index(stop) + 1]


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = phds.tiny_model("qwen3_moe")
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    alone = Engine(model).generate([PROMPTS[1]], 2, params)[0]
    batched = Engine(model).generate([PROMPTS[0], PROMPTS[1]], [4, 2], params)[1]
    assert alone == batched


def test_max_seq_len_ends_a_request_with_length():
    engine = Engine(phds.tiny_model("olmoe"), max_seq_len=8)
    out = engine.generate([PROMPTS[0]], 1, SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(out) == 8 - len(PROMPTS[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k"),
        (dict(k=9), "k"),
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=[1, 500]), "prompt_ids"),
    ],
)
def test_bad_requests_raise_value_error_before_queueing(kwargs, match):
    engine = Engine(phds.tiny_model("olmoe"))
    fields = dict(request_id="r", prompt_ids=[1, 5], k=2, params=SamplingParams()) | kwargs
    with pytest.raises(ValueError, match=match):
        engine.add(Request(**fields))
    assert not engine.has_work()


def test_duplicate_request_id_is_rejected():
    engine = Engine(phds.tiny_model("olmoe"))
    engine.add(Request(request_id="r", prompt_ids=[1, 5], k=2, params=SamplingParams()))
    with pytest.raises(ValueError, match="request_id"):
        engine.add(Request(request_id="r", prompt_ids=[1, 5], k=2, params=SamplingParams()))


def test_sliding_window_rows_longer_than_the_window_match_generate():
    model = phds.tiny_model("gpt_oss")  # sliding_window=16 on every other layer
    prompts = [list(range(4, 26)), [1, 9, 9]]
    outputs = Engine(model).generate(prompts, [2, 3], SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, k, output in zip(prompts, [2, 3], outputs, strict=True):
        with phds.sparsity(model, k):
            ids = torch.tensor([prompt])
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
            )
        assert output == ref[0, len(prompt) :].tolist()


def test_engine_runs_the_sparse_experts_and_restores_the_models_own_setting_when_idle():
    model = phds.tiny_model("olmoe")
    model.set_experts_implementation("eager")
    engine = Engine(model)
    engine.add(Request(request_id="r", prompt_ids=[1, 5], k=2, params=SamplingParams(max_new_tokens=3)))
    engine.step()
    assert model.config._experts_implementation == "phds" and phds.get_k(model) == 2
    assert type(model.lm_head) is DecodeLinear  # one-row decode matmuls at memory bandwidth (engine/decode_linear.py)
    while engine.has_work():
        engine.step()
    assert model.config._experts_implementation == "eager" and phds.get_k(model) == 4
    assert type(model.lm_head) is torch.nn.Linear


def test_short_cpu_forwards_use_eager_attention_and_long_prompts_keep_the_models_own(monkeypatch):
    monkeypatch.setattr(engine_module, "EAGER_ATTENTION_MAX_NEW", 4)
    model = phds.tiny_model("olmoe")
    assert model.config._attn_implementation == "sdpa"
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            (kwargs["hidden_states"].shape[1], model.config._attn_implementation)
        ),
        with_kwargs=True,
    )
    long, short = PROMPTS[2], PROMPTS[1]  # 8 and 3 tokens
    engine = Engine(model)
    out = [engine.generate([prompt], 2, SamplingParams(max_new_tokens=3))[0] for prompt in (long, short)]
    decode = [(1, "eager")] * 2
    assert seen == [(len(long), "sdpa"), *decode, (len(short), "eager"), *decode]
    assert model.config._attn_implementation == "sdpa"
    assert out == [_hf_greedy(model, prompt, 2, 3) for prompt in (long, short)]


def test_compile_compiles_only_the_decode_forward(monkeypatch):
    compiled = []

    def fake_compile(function, **kwargs):
        compiled.append(kwargs)
        return lambda **inputs: (compiled.append(inputs["input_ids"].shape), function(**inputs))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = phds.tiny_model("olmoe")
    engine = Engine(model, compile=True)
    out = engine.generate([PROMPTS[1]], 2, SamplingParams(max_new_tokens=4))
    assert out == Engine(model).generate([PROMPTS[1]], 2, SamplingParams(max_new_tokens=4))
    assert compiled[0] == {"dynamic": True, "options": COMPILE_OPTIONS}
    assert compiled[1:] == [torch.Size([1, 1])] * 3  # the 3 decode steps; the prefill ran uncompiled


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler"
)
def test_compiled_decode_is_one_graph_per_k_and_matches_the_eager_engine():
    """A real torch.compile (tens of seconds on 2 CPU cores): one token's experts are gathered in the graph, a
    batch's run as an opaque op, so nothing breaks the graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = phds.tiny_model("olmoe")
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    compiled = Engine(model, max_batch_size=2, max_seq_len=32, compile=True)
    eager = Engine(model, max_batch_size=2, max_seq_len=32)
    for prompts, ks in [([PROMPTS[1]], 2), ([PROMPTS[0], PROMPTS[2]], [1, 3])]:
        assert compiled.generate(prompts, ks, params) == eager.generate(prompts, ks, params)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert 2 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_generate_checks_every_prompt_before_queueing_any():
    engine = Engine(phds.tiny_model("olmoe"))
    with pytest.raises(ValueError, match="k"):
        engine.generate([[1, 5], [1, 6]], [2, 99])
    assert not engine.has_work()


def test_a_row_finishing_at_prefill_leaves_the_other_rows_intact():
    model = phds.tiny_model("qwen2_moe")
    engine = Engine(model, max_batch_size=4)
    long = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.add(Request(request_id="long", prompt_ids=PROMPTS[0], k=2, params=long))
    engine.step()
    engine.add(Request(request_id="one", prompt_ids=PROMPTS[1], k=1, params=SamplingParams(max_new_tokens=1)))
    engine.add(Request(request_id="late", prompt_ids=PROMPTS[2], k=4, params=long))
    tokens: dict[str, list[int]] = {"long": []}
    events = []
    while engine.has_work():
        events.extend(engine.step())
    for event in events:
        tokens.setdefault(event.request_id, []).append(event.token_id)
    assert len(tokens["one"]) == 1
    assert tokens["late"] == Engine(model).generate([PROMPTS[2]], 4, long)[0]
    assert len(tokens["long"]) == 5  # the first token came from the first step
