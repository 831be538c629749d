"""Turn a stream of token ids into a stream of text, cut at the first stop string.

Two things make this more than `decode(new_token)`: a token may end in the middle of a multi-byte character (its
decode ends in U+FFFD until the next token completes it), and a stop string may arrive split across tokens. So the
whole completion is decoded each time (cheap next to a decode step), text is only released once it is stable, and
any tail that could still grow into a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_INCOMPLETE = "\ufffd"


@dataclass
class TextStream:
    """Incremental detokeniser with stop strings.

    Args:
        tokenizer: a transformers tokenizer (only `decode` is used).
        stop: stop strings; the text ends just before the first one, which is not returned.

    Example:
        >>> stream = TextStream(tok, stop=["\\n"])
        >>> stream.push(token_id)  # -> newly released text ("" while held back)
        >>> stream.stopped        # True once a stop string was seen; stop the request then
    """

    tokenizer: object
    stop: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stopped: bool = False
    _decoded: str = ""  # stable decoded text of token_ids (no trailing incomplete character)
    _released: int = 0  # characters of _decoded already handed out

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that can be released now."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not text.endswith(_INCOMPLETE):
            self._decoded = text
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release whatever was held back (a partial stop-string match is plain text)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        self._decoded = text
        return self._release(final=True)

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self._decoded[: self._released]

    def _release(self, *, final: bool) -> str:
        pending = self._decoded[self._released :]
        # A stop string cannot start inside released text: any tail that could begin one is held back below.
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out = pending[: min(hits)]
        elif final:
            out = pending
        else:
            out = pending[: len(pending) - self._held_back(pending)]
        self._released += len(out)
        return out

    def _held_back(self, pending: str) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(pending)), longest, -1):
                if pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
