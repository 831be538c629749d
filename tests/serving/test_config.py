"""Which ks a server offers: --k-set, else the checkpoint's sidecar, else k_pre; bad settings fail before serving."""

from __future__ import annotations

import pytest

import phds
from phds.serving import ServeConfig, Service
from phds.serving.config import resolve_ks, served_name


def test_ks_come_from_the_sidecar_then_k_set_then_k_pre(checkpoint):
    with_sidecar, _ = phds.load(checkpoint, device="cpu", tokenizer=False)
    assert resolve_ks(with_sidecar, None, None) == ([1, 2, 4], 4)
    assert resolve_ks(with_sidecar, [2, 1], None) == ([1, 2], 2)
    plain, _ = phds.load("tiny:olmoe", device="cpu", tokenizer=False)
    assert resolve_ks(plain, None, None) == ([4], 4)
    assert resolve_ks(plain, [1, 2], 1) == ([1, 2], 1)


def test_ks_beyond_the_expert_count_or_a_default_outside_them_are_value_errors(checkpoint):
    model, _ = phds.load(checkpoint, device="cpu", tokenizer=False)
    with pytest.raises(ValueError, match=r"`k_set`.*\[9\]"):
        resolve_ks(model, [1, 9], None)
    with pytest.raises(ValueError, match="`default_k`"):
        resolve_ks(model, None, 3)


def test_the_served_name_is_the_directory_name_or_the_name_as_given(checkpoint):
    assert served_name(checkpoint) == "tiny-phds"
    assert served_name("tiny:olmoe") == "tiny:olmoe"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 70000),
        ("host", "example.com"),
        ("max_batch", 0),
        ("max_queue", -1),
        ("auto_target_ms", 0.0),
        ("served_model_name", "a@b"),
        ("drain_timeout_s", -1.0),
        ("threads", 0),
    ],
)
def test_bad_serve_settings_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        ServeConfig(model="tiny:olmoe", **{field: value})


@pytest.mark.parametrize(
    ("options", "adaptive", "threads"),
    [({}, True, None), ({"compile": True}, False, None), ({"threads": 1}, False, 1)],
)
def test_a_cpu_server_follows_the_free_cores_unless_compiled_or_told_a_count(checkpoint, options, adaptive, threads):
    policy = Service.from_config(ServeConfig(model=checkpoint, device="cpu", **options)).runner.engine.threads
    assert policy.adaptive == adaptive
    assert threads is None or policy.threads == threads
