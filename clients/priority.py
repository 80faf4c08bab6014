"""Priority classes: `interactive` (chat; the default) and `batch` (documents, evaluations).

The scheduler admits and orders by class (clients/scheduler.py): interactive sequences are
admitted first and never give way to batch ones; batch sequences fill what is left of each round
(at most `batch.max_round_tokens` tokens while interactive work is recent, so the round in
flight when an interactive request arrives is short; the rest sit the round out, keeping KV) and are the first preempted when room runs out. Each class has its own
limits; a full queue refuses new requests with RESOURCE_EXHAUSTED. Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.errors import InvalidRequest

PRIORITIES = ("interactive", "batch")  # admission order
DEFAULT_PRIORITY = "interactive"


def check_priority(priority: str, field: str = "priority") -> str:
    if priority not in PRIORITIES:
        raise InvalidRequest(field, f"{priority!r}: one of {', '.join(PRIORITIES)}")
    return priority


def rank(priority: str) -> int:
    """Sort key: lower goes first."""
    return PRIORITIES.index(priority)


@dataclass(frozen=True)
class ClassLimits:
    max_running: int = 64
    """Most sequences of this class running at once."""
    max_queued: int = 1024
    """Most sequences of this class waiting; one more is refused (RESOURCE_EXHAUSTED)."""
    max_round_tokens: int = 2048
    """Batch only: most target tokens (step + draft) of the class in one round while
    interactive work is recent (SchedulerConfig.interactive_window_rounds)."""

    def __post_init__(self):
        for name in ("max_running", "max_queued", "max_round_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")

    @classmethod
    def coerce(cls, value: "ClassLimits | dict") -> "ClassLimits":
        """A config table (dict) or an instance."""
        return value if isinstance(value, ClassLimits) else cls(**value)


DEFAULT_BATCH = ClassLimits(max_round_tokens=4)
