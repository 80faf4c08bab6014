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
