"""Per-round random generators derived from (seed, position, role): stateless, so batching,
retries and evictions never change which random numbers a sequence sees."""

from __future__ import annotations

import hashlib
import secrets

import torch


def round_generator(seed: int | None, position: int, role: str) -> torch.Generator:
    """A CPU generator for one round of one sequence; fresh entropy when seed is None."""
    gen = torch.Generator()
    if seed is None:
        gen.manual_seed(secrets.randbits(63))
        return gen
    digest = hashlib.blake2b(f"{seed}:{position}:{role}".encode(), digest_size=8).digest()
    gen.manual_seed(int.from_bytes(digest, "little") >> 1)
    return gen
