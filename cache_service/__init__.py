"""Cache service: Redis-backed prefix-KV chunks and result cache, shared by every replica.

Layers (none imports upwards): keys (hashing) and codec (stored values) -> store (Redis layout)
-> engine (logic, stats; no gRPC) -> servicer (proto <-> engine) -> __main__ (flags, server).
"""
