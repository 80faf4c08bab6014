"""specmesh: speculative decoding as gRPC services.

    from specmesh import Client, AsyncClient, GenerationParams, launch, Security

The user API is re-exported lazily (importing the contract, `specmesh.v1` / `specmesh.wire`,
stays light: no client, no torch)."""

_EXPORTS = {
    "AsyncClient": "specmesh.clients.facade",
    "Client": "specmesh.clients.facade",
    "launch": "specmesh.clients.facade",
    "GenerationParams": "specmesh.clients.types",
    "GenerationResult": "specmesh.clients.types",
    "Security": "specmesh.wire.security",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
