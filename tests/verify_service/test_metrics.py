"""The verify service exports batch, round, KV and request metrics on its metrics port."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from specmesh.model_service.config import ModelServiceConfig
from specmesh.model_service.startup import build_servicer
from specmesh.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from specmesh.verify_service.__main__ import SERVICE_NAME, SPEC
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.server import build_server
from tests.conftest import TINY_TARGET

pytestmark = pytest.mark.models


async def test_verify_metrics_are_scraped(models):
    metrics = ServiceMetrics("verify")
    port = start_metrics_server(0, metrics)
    config = ModelServiceConfig(model=str(models / TINY_TARGET))
    servicer = await build_servicer(SPEC, config, metrics)
    server = await build_server(
        [(verify_pb2_grpc.add_VerifyServiceServicer_to_server, servicer)], [SERVICE_NAME],
        interceptors=[MetricsInterceptor(metrics)])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = verify_pb2_grpc.VerifyServiceStub(ch)
            header = common_pb2.SequenceHeader(sequence_id="m", new_tokens=[1, 403, 407])
            tree = common_pb2.TokenTree(tokens=[261, 378], parents=[-1, 0])
            reply = await stub.Verify(verify_pb2.VerifyRequest(header=header, tree=tree))
            step = common_pb2.SequenceHeader(sequence_id="m", new_tokens=reply.tokens[-1:],
                                             num_cached_tokens=reply.num_cached_tokens)
            await stub.Verify(verify_pb2.VerifyRequest(header=step))  # a plain step: no round
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Verify(verify_pb2.VerifyRequest(header=common_pb2.SequenceHeader(
                    sequence_id="x", num_cached_tokens=4)))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = body.decode()
    finally:
        await server.stop(0.5)
        await servicer.close()
    assert 'specmesh_batch_size_count{service="verify"} 3.0' in text  # two ok, one NOT_FOUND
    assert 'specmesh_draft_tokens_total{service="verify"} 2.0' in text
    assert 'specmesh_accepted_tokens_total{service="verify"} 2.0' in text
    assert 'specmesh_accepted_per_round_count{service="verify"} 1.0' in text  # speculation only
    assert 'specmesh_kv_blocks_used{service="verify"}' in text
    assert 'code="NOT_FOUND"' in text and 'method="VerifyService/Verify"' in text
