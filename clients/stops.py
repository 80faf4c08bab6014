"""Stop strings, cut exactly whatever a round commits (pure functions, no I/O).

A speculative round commits several tokens at once; a stop string may complete at any of them.
`first_stop` finds the first token after which the text holds a stop string, so a generation
keeps exactly the tokens target-only decoding (one token per round) would have kept.
`visible_text` is what may be shown so far: the text before the stop string once one matched,
else the text minus any tail that could still grow into a stop string (as vLLM holds it back),
so streamed text never shows part of a stop string, in any mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(position, stop) of the earliest stop string in `text` (ties: the longest), or None."""
    hits = [(text.find(s), -len(s), s) for s in stops if s and s in text]
    if not hits:
        return None
    pos, _, stop = min(hits)
    return pos, stop


def first_stop(decode: Callable[[list[int]], str], before: Sequence[int], new: Sequence[int],
               stops: Sequence[str]) -> tuple[int, str] | None:
    """(j, stop): keeping new[:j] is the first prefix of `new` whose text (after `before`)
    holds `stop`; None when even all of `new` holds none."""
    if not stops or find_stop(decode(list(before) + list(new)), stops) is None:
        return None
    for j in range(1, len(new) + 1):
        hit = find_stop(decode(list(before) + list(new[:j])), stops)
        if hit is not None:
            return j, hit[1]
    return None  # unreachable: the whole of `new` matched above


def visible_text(text: str, stops: Sequence[str], finished: bool) -> str:
    """The part of `text` a caller may see: cut before the first stop string; while running,
    also without a tail that is a proper prefix of some stop string."""
    hit = find_stop(text, stops)
    if hit is not None:
        return text[:hit[0]]
    if finished:
        return text
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[:len(text) - hold]
