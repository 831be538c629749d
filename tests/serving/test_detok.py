"""Incremental detokenisation: stable text only, stop strings cut even when split across tokens."""

from __future__ import annotations

import phds
from phds.serving.detok import TextStream

TOK = phds.tiny_tokenizer()


def push_all(stream: TextStream, text: str) -> str:
    out = "".join(stream.push(i) for i in TOK(text).input_ids)
    return out + stream.finish()


def test_without_stop_strings_the_stream_is_the_full_decode():
    stream = TextStream(TOK)
    assert push_all(stream, "hello world") == "hello world"
    assert stream.text == "hello world"


def test_a_stop_string_split_across_tokens_ends_the_text_before_it():
    stream = TextStream(TOK, stop=["wor"])
    released = [stream.push(i) for i in TOK("hello world").input_ids]
    assert "".join(released) == "hello "
    assert stream.stopped
    assert stream.push(TOK("x").input_ids[0]) == ""  # nothing after the stop


def test_a_possible_stop_prefix_is_held_back_then_released_when_it_does_not_complete():
    stream = TextStream(TOK, stop=["abc"])
    assert stream.push(TOK("x").input_ids[0]) == "x"
    assert stream.push(TOK("a").input_ids[0]) == ""  # could be the start of "abc"
    assert stream.push(TOK("b").input_ids[0]) == ""
    assert stream.push(TOK("d").input_ids[0]) == "abd"
    assert stream.push(TOK("a").input_ids[0]) == ""
    assert stream.finish() == "a"  # the request ended: a partial match is just text
    assert not stream.stopped


def test_the_earliest_of_several_stop_strings_wins():
    stream = TextStream(TOK, stop=["d", "b"])
    assert push_all(stream, "abcd") == "a"


class _ByteTokenizer:
    """Ids are UTF-8 bytes; an incomplete character decodes to U+FFFD, as byte-level BPE tokenizers do."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_an_incomplete_multibyte_character_is_held_until_it_completes():
    stream = TextStream(_ByteTokenizer())
    euro = "€".encode()
    assert [stream.push(b) for b in b"a" + euro] == ["a", "", "", "€"]
