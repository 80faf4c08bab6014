"""Which rounds teach the adaptive policy its draft cost: chains only (`batch_loop._is_chain`),
in draft rows, at the steady state (`batch_loop._steady_rows`)."""

from __future__ import annotations

import grpc

from specmesh.clients.batch_loop import _depth, _is_chain, _steady_rows
from specmesh.clients.plan import SequenceDelta
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


def delta(seq_id: str, new_tokens: int) -> SequenceDelta:
    return SequenceDelta(seq_id, 10, tuple(range(new_tokens)), 10, (1,))


def test_a_round_teaches_the_draft_rows_it_fed_in_the_steady_state_only():
    chain5, chain3 = proposal([-1, 0, 1, 2, 3]), proposal([-1, 0, 1])
    # one new token each: a row per depth; a whole chain accepted: two new tokens, one more row
    assert _steady_rows([delta("a", 1), delta("b", 1)], [chain5, chain3]) == 8
    assert _steady_rows([delta("a", 2), delta("b", 1)], [chain5, chain3]) == 9
    assert _steady_rows([delta("a", 1), delta("b", 1)], [chain5, None]) == 5  # b: no draft
    assert _steady_rows([delta("a", 1), delta("b", 30)], [chain5, chain3]) is None  # a prompt
