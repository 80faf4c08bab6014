"""The one place status names become gRPC status codes, and back (client side).

The classes live in `specmesh.errors` (no gRPC); they are re-exported here for wire users.
"""

from __future__ import annotations

import ast

import grpc

from specmesh.errors import (
    BY_CODE,
    CapacityExhausted,
    InvalidRequest,
    NotReady,
    RemoteError,
    SpecMeshError,
    UnknownModel,
    UnknownSequence,
)

__all__ = ["CapacityExhausted", "InvalidRequest", "NotReady", "RemoteError", "SpecMeshError",
           "UnknownModel", "UnknownSequence", "error_from_rpc", "status_code"]


def status_code(exc: SpecMeshError) -> grpc.StatusCode:
    """The gRPC status of one of our errors (INTERNAL for a name gRPC does not know)."""
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


def error_from_rpc(err: grpc.RpcError) -> SpecMeshError:
    """Map a failed RPC back to the exception class of its status code."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = BY_CODE.get(code.name)
    if cls is InvalidRequest:
        field, _, problem = (details or "").partition(": ")
        return InvalidRequest(field, problem)
    if cls is None:
        return RemoteError(code.name, details)
    prefix = "model: unknown model "
    if cls is UnknownSequence and (details or "").startswith(prefix):
        name = details[len(prefix):].split(" (served", 1)[0]
        try:
            name = ast.literal_eval(name)
        except (ValueError, SyntaxError):
            pass
        return UnknownModel(str(name), message=details)  # the gateway's message, kept whole
    return cls(details)
