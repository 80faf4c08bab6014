"""Server plumbing: a taken port is refused (no SO_REUSEPORT traffic splitting)."""

from __future__ import annotations

import pytest

from specmesh.wire.server import build_server


async def test_second_server_on_a_taken_port_fails():
    first = await build_server([], [], port=0)
    await first.start()
    try:
        with pytest.raises(RuntimeError, match="bind"):
            await build_server([], [], port=first.port)
    finally:
        await first.stop(0)


def test_internal_value_errors_are_not_blamed_on_the_caller():
    from kernels.sampling import SamplingConfig
    from specmesh.wire.errors import InvalidRequest, as_wire_error

    internal = as_wire_error(ValueError("an invariant broke"))
    assert not isinstance(internal, InvalidRequest)  # INTERNAL at the boundary
    try:
        SamplingConfig(temperature=1.0, top_p=2.0).validate()
    except ValueError as exc:
        mapped = as_wire_error(exc)
    assert isinstance(mapped, InvalidRequest) and mapped.field == "sampling.top_p"
