"""One exception hierarchy for every layer, with no gRPC in it.

Each class names its status as a string (`code = "NOT_FOUND"`); only `specmesh.wire.errors`
turns that name into a grpc.StatusCode, in the server's one error interceptor and in batched
replies. Engines and the model-service layer raise these; anything else that escapes a handler
is a bug and reaches the caller as INTERNAL (logged), never as the caller's fault.
"""

from __future__ import annotations


class SpecMeshError(Exception):
    """Base class. `code` is the name of the status the error maps to."""

    code: str = "INTERNAL"


class InvalidRequest(SpecMeshError):
    """A request field is malformed; the message names the field."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


OWNER_SEP = "\x00"  # services keep a sequence as OWNER + OWNER_SEP + the caller's id


class UnknownSequence(SpecMeshError):
    """The service holds no state for this sequence id (never seen, released or evicted)."""

    code = "NOT_FOUND"

    @classmethod
    def for_id(cls, seq_id: str, field: str = "header.sequence_id") -> "UnknownSequence":
        seq_id = seq_id.rpartition(OWNER_SEP)[2]  # the caller's own id, not its owner scope
        return cls(f"{field}: unknown sequence {seq_id!r} (never seen, released or evicted); "
                   "resend with num_cached_tokens=0")


class UnknownModel(SpecMeshError):
    """The request names a model (or name@version) the gateway does not serve."""

    code = "NOT_FOUND"

    def __init__(self, model: str, known: list[str] | tuple[str, ...] = (),
                 message: str | None = None):
        served = ", ".join(known) if known else "none"
        super().__init__(message or f"model: unknown model {model!r} (served: {served})")
        self.field = "model"
        self.model = model


class CapacityExhausted(SpecMeshError):
    """No room right now (KV blocks, queue); retry later."""

    code = "RESOURCE_EXHAUSTED"


class NotReady(SpecMeshError):
    """The service is starting or draining."""

    code = "UNAVAILABLE"


class Unauthenticated(SpecMeshError):
    """No bearer token, or one the service does not know (or a TLS identity it rejects)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(SpecMeshError):
    """The caller's role may not make this call (e.g. a client token writing the cache)."""

    code = "PERMISSION_DENIED"


class RemoteError(SpecMeshError):
    """A failed call whose status has no class of its own (client side); `code` is its name."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code


BY_CODE: dict[str, type[SpecMeshError]] = {
    cls.code: cls for cls in (InvalidRequest, UnknownSequence, CapacityExhausted, NotReady,
                              Unauthenticated, PermissionDenied)}
