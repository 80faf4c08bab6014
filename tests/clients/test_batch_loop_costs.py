"""Which rounds teach the adaptive policy its draft cost: chains only (`batch_loop._is_chain`)."""

from __future__ import annotations

import grpc

from specmesh.clients.batch_loop import _depth, _is_chain
from specmesh.v1 import common_pb2, draft_pb2


def proposal(parents: list[int]) -> draft_pb2.ProposeResponse:
    tree = common_pb2.TokenTree(tokens=list(range(len(parents))), parents=parents)
    return draft_pb2.ProposeResponse(tree=tree)


def test_chains_teach_the_draft_cost_and_wider_trees_do_not():
    chain, tree = proposal([-1, 0, 1, 2]), proposal([-1, -1, 0, 2])  # a chain / two roots
    assert _depth(chain) == 4 and _is_chain(chain)
    assert _depth(tree) == 3 and not _is_chain(tree)
    assert _is_chain(proposal([]))  # no tree: nothing drafted
    assert _is_chain(grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, None, None))
