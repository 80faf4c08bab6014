"""Hand-written wire plumbing shared by every service and client (no torch, no model code)."""

from specmesh.wire.errors import (
    CapacityExhausted,
    InvalidRequest,
    NotReady,
    SpecMeshError,
    UnknownSequence,
    error_from_rpc,
)

__all__ = [
    "CapacityExhausted",
    "InvalidRequest",
    "NotReady",
    "SpecMeshError",
    "UnknownSequence",
    "error_from_rpc",
]
