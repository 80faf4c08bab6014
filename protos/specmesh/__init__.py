"""specmesh: speculative decoding as gRPC services.

    from specmesh import Client, AsyncClient, GenerationParams, launch

The user API is re-exported lazily (importing the contract, `specmesh.v1` / `specmesh.wire`,
stays light: no client, no torch)."""

_EXPORTS = {
    "AsyncClient": "clients.facade",
    "Client": "clients.facade",
    "launch": "clients.facade",
    "GenerationParams": "clients.types",
    "GenerationResult": "clients.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
