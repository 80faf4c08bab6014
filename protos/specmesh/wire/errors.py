"""One exception hierarchy; each class declares its gRPC status code.

Engines raise these (they know nothing of gRPC); the server interceptor in `server.py` turns them
into statuses, and clients turn statuses back into the same classes with `error_from_rpc`.
"""

from __future__ import annotations

import grpc


class SpecMeshError(Exception):
    """Base class. `code` is the gRPC status the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(SpecMeshError):
    """A request field is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnknownSequence(SpecMeshError):
    """The service holds no state for this sequence id (never seen, released or evicted)."""

    code = grpc.StatusCode.NOT_FOUND


class CapacityExhausted(SpecMeshError):
    """No room right now (KV blocks, queue); retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(SpecMeshError):
    """The service is starting or draining."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[SpecMeshError]] = {
    InvalidRequest.code: InvalidRequest,
    UnknownSequence.code: UnknownSequence,
    CapacityExhausted.code: CapacityExhausted,
    NotReady.code: NotReady,
}


def error_from_rpc(err: grpc.RpcError) -> SpecMeshError:
    """Map a failed RPC back to the exception class of its status code."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code)
    if cls is InvalidRequest:
        field, _, problem = (details or "").partition(": ")
        return InvalidRequest(field, problem)
    if cls is None:
        exc = SpecMeshError(f"{code.name}: {details}")
        exc.code = code
        return exc
    return cls(details)


def as_wire_error(exc: Exception) -> Exception:
    """Map a domain error from an engine's lower layers to its SpecMeshError class.

    Lower layers (kernels) know nothing of gRPC; their errors declare `wire_status`
    ("INVALID_ARGUMENT" with `field`/`problem`, or "NOT_FOUND"). Anything else passes through
    and becomes INTERNAL: a plain ValueError is a broken invariant, not the caller's fault.
    """
    if isinstance(exc, SpecMeshError):
        return exc
    status = getattr(exc, "wire_status", None)
    if status == "INVALID_ARGUMENT":
        return InvalidRequest(exc.field, exc.problem)
    if status == "NOT_FOUND":
        seq = exc.args[0] if exc.args else "?"
        return UnknownSequence(f"header.sequence_id: unknown sequence {seq!r} (never seen, "
                               "released or evicted); resend with num_cached_tokens=0")
    return exc
