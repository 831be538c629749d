"""Request bodies: OpenAI's fields and our `k`, refused before any model work when they cannot be served."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from phds.serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


def test_k_may_be_an_int_auto_or_absent():
    assert CompletionRequest(model="m", prompt="a", k=2).k == 2
    assert CompletionRequest(model="m", prompt="a", k="auto").k == "auto"
    assert CompletionRequest(model="m", prompt="a").k is None


@pytest.mark.parametrize("k", [0, -1, True, "two", 2.5])
def test_a_k_that_is_not_a_positive_int_or_auto_is_refused(k):
    with pytest.raises(ValidationError, match="k"):
        CompletionRequest(model="m", prompt="a", k=k)


def test_stop_becomes_a_list_and_more_than_four_are_refused():
    assert CompletionRequest(model="m", prompt="a", stop="\n").stop == ["\n"]
    assert CompletionRequest(model="m", prompt="a").stop == []
    with pytest.raises(ValidationError, match="stop"):
        CompletionRequest(model="m", prompt="a", stop=list("abcde"))


def test_a_one_element_prompt_list_is_one_prompt_and_batches_are_refused():
    assert CompletionRequest(model="m", prompt=["hi"]).prompt == "hi"
    assert CompletionRequest(model="m", prompt=[5, 6]).prompt == [5, 6]
    with pytest.raises(ValidationError, match="one prompt"):
        CompletionRequest(model="m", prompt=["a", "b"])


@pytest.mark.parametrize(("field", "value"), [("n", 3), ("echo", True), ("presence_penalty", 0.5), ("logprobs", 2)])
def test_unsupported_options_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        CompletionRequest(model="m", prompt="a", **{field: value})


def test_unknown_fields_are_refused_so_typos_do_not_silently_run_at_the_default_k():
    with pytest.raises(ValidationError, match="K"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a"}], K=2)


def test_chat_text_parts_are_joined_and_other_parts_refused():
    message = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert message.text() == "ab"
    with pytest.raises(ValueError, match="text"):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]).text()


def test_max_completion_tokens_wins_over_the_deprecated_max_tokens():
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "a"}], max_tokens=5, max_completion_tokens=7
    )
    assert request.limit() == 7
