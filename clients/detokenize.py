"""Text of a growing token sequence, decoded a short window per step (pure, no I/O).

    text = IncrementalText(codec.decode, unsafe_ids=codec.irregular_ids)
    text.extend(new_ids)   # == codec.decode(all ids so far), without decoding them all again

Re-decoding a whole generation every round costs O(length) per round (~0.4 ms at 2,048
tokens with this repository's tokenizer, per sequence, per round: quadratic over a long
generation). As vLLM and TGI do, each step decodes only the tokens since the previous step's
start (`prefix`) and appends what they add beyond the previous step's text; the window's own
first token keeps its context, so a leading space it carries is not stripped. Exactness is kept
by decoding everything instead (once, for that step) where a window cannot be trusted to join:
the new text holds U+FFFD (a character whose bytes are still arriving), or the window holds a
byte-fallback token (`<0x41>`: a run of them decodes as a unit) or a special one (dropped from
the text, so the token after it would lose its leading space). Property-tested against full
decodes on two tokenizer families (tests/clients/test_detokenize.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], unsafe_ids: Collection[int] = ()):
        self._decode = decode
        self._unsafe = frozenset(unsafe_ids)
        self.ids: list[int] = []
        self.text = ""  # == decode(self.ids)
        self._prefix = 0  # the window's start: the previous step's first new token

    def extend(self, new: Sequence[int]) -> str:
        """Append `new`; return the decoded text of every id so far."""
        start = len(self.ids)
        self.ids.extend(new)
        window = self.ids[self._prefix:]
        if not self._unsafe.isdisjoint(window):
            return self._full(start)
        before = self._decode(self.ids[self._prefix:start])
        after = self._decode(window)
        if not after.startswith(before) or REPLACEMENT in after[len(before):]:
            return self._full(start)
        self.text += after[len(before):]
        self._prefix = start
        return self.text

    def peek(self, new: Sequence[int]) -> str:
        """The text `extend(new)` would return, changing nothing (stop-string checks try a
        round's tokens one prefix at a time)."""
        size, text, prefix = len(self.ids), self.text, self._prefix
        try:
            return self.extend(new)
        finally:
            del self.ids[size:]
            self.text, self._prefix = text, prefix

    def _full(self, start: int) -> str:
        self.text = self._decode(self.ids)
        self._prefix = start
        return self.text
