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
    import grpc

    from specmesh.model_service.servicer import sampling_config
    from specmesh.v1 import common_pb2
    from specmesh.wire.batch_rpc import item_error
    from specmesh.wire.errors import InvalidRequest

    internal = item_error(ValueError("an invariant broke"))
    assert internal.code == grpc.StatusCode.INTERNAL.value[0]  # INTERNAL at the boundary
    with pytest.raises(InvalidRequest) as info:
        sampling_config(common_pb2.SamplingParams(temperature=1.0, top_p=2.0))
    assert info.value.field == "sampling.top_p"


async def test_a_value_error_in_a_handler_is_internal_not_invalid_argument():
    """An internal ValueError reaches the caller as INTERNAL (and is logged), never as a bad
    field of theirs."""
    import grpc

    from specmesh.v1 import common_pb2, verify_pb2_grpc

    class Broken(verify_pb2_grpc.VerifyServiceServicer):
        async def GetModelInfo(self, request, context):
            raise ValueError("an invariant broke")

    server = await build_server([(verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                                  Broken())], [], port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await verify_pb2_grpc.VerifyServiceStub(ch).GetModelInfo(
                    common_pb2.ModelInfoRequest())
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "ValueError" in info.value.details()
    finally:
        await server.stop(0)
