"""Scheduler: exact admission, retirement, deltas, NOT_FOUND resend and requeue."""

from __future__ import annotations

import dataclasses

import pytest

from specmesh.clients.scheduler import (
    CommitResult,
    NewSequence,
    Scheduler,
    SchedulerConfig,
    SequenceDelta,
    SequenceRequest,
    StepPlan,
)

EOS = 2


def req(rid: str, prompt_len: int = 3, max_new: int = 16, spec: int = 0, **kw) -> SequenceRequest:
    prompt = tuple(100 + i for i in range(prompt_len))
    return SequenceRequest(rid, prompt, max_new, eos_token_id=EOS, max_spec_tokens=spec, **kw)


def sched(max_running=64, max_batch_tokens=2048, relax=32, policy=None) -> Scheduler:
    return Scheduler(SchedulerConfig(max_running, max_batch_tokens, relax), policy)


def ids(plan: StepPlan) -> tuple[list[str], list[str]]:
    return [n.seq_id for n in plan.new], [d.seq_id for d in plan.running]


# -- admission ---------------------------------------------------------------------------------
def test_admits_fifo_up_to_max_running():
    s = sched(max_running=2)
    for rid in "abcd":
        s.add(req(rid))
    plan = s.schedule()
    assert ids(plan) == (["a", "b"], [])
    assert plan.new[0] == NewSequence("a", (100, 101, 102))
    assert s.waiting_ids == ["c", "d"] and s.running_ids == ["a", "b"]
    assert s.schedule().new == ()  # full: nobody else gets in
    s.finish("a", "cancelled")
    plan = s.schedule()
    assert ids(plan) == (["c"], ["b"])
    assert plan.finished_sequence_ids == ("a",)
    assert s.waiting_ids == ["d"]


def test_admission_stops_at_the_token_cap_in_strict_fifo():
    s = sched(max_batch_tokens=10)
    s.add(req("a", prompt_len=4))
    s.add(req("b", prompt_len=4))
    s.add(req("c", prompt_len=3))  # 4 + 4 + 3 = 11 > 10
    s.add(req("d", prompt_len=1))  # would fit, but may not overtake c
    plan = s.schedule()
    assert ids(plan) == (["a", "b"], [])
    assert plan.num_batch_tokens == 8
    s.commit("a", [7])  # a and b now need 1 step token each
    s.commit("b", [8])
    plan = s.schedule()
    assert ids(plan) == (["c", "d"], ["a", "b"])
    assert plan.num_batch_tokens == 1 + 1 + 3 + 1


def test_token_cap_is_inclusive():
    s = sched(max_batch_tokens=8)
    s.add(req("a", prompt_len=4))
    s.add(req("b", prompt_len=4))
    assert ids(s.schedule()) == (["a", "b"], [])


def test_an_oversized_head_runs_alone():
    s = sched(max_batch_tokens=10)
    s.add(req("big", prompt_len=50))
    s.add(req("small", prompt_len=2))
    plan = s.schedule()
    assert ids(plan) == (["big"], [])
    assert plan.num_batch_tokens == 50
    s.commit("big", [7])
    assert ids(s.schedule()) == (["small"], ["big"])


def test_running_sequences_always_run_even_past_the_cap():
    s = sched(max_batch_tokens=10)
    s.add(req("a", prompt_len=6))
    s.add(req("b", prompt_len=4))
    s.schedule()
    s.reset_remote("a", "target")  # a must resend 6 tokens, b 4: 10, no room for c
    s.reset_remote("b", "target")
    s.add(req("c", prompt_len=1))
    plan = s.schedule()
    assert ids(plan) == ([], ["a", "b"])
    assert s.waiting_ids == ["c"]


# -- deltas ------------------------------------------------------------------------------------
def test_deltas_after_a_speculative_round_are_exact():
    s = sched()
    s.add(req("a", prompt_len=3))
    s.schedule()
    out = s.commit("a", [7, 8, 9], num_draft_tokens=4, num_accepted_tokens=2)
    assert out == CommitResult((7, 8, 9), None)
    seq = s.get("a")
    assert seq.token_ids == [100, 101, 102, 7, 8, 9]
    assert (seq.draft_cached, seq.target_cached) == (3, 5)  # draft: what it was sent
    assert (seq.num_rounds, seq.num_draft_tokens, seq.num_accepted_tokens) == (1, 4, 2)
    plan = s.schedule()
    assert plan.new == ()
    assert plan.running == (SequenceDelta("a", 3, (7, 8, 9), 5, (9,)),)
    assert plan.num_batch_tokens == 1


def test_deltas_after_a_plain_decode_round_keep_the_draft_behind():
    s = sched()
    s.add(req("a", prompt_len=3))
    s.schedule()
    s.commit("a", [7])  # no draft call: the draft still holds nothing
    s.schedule()
    s.commit("a", [8, 9], num_draft_tokens=1, num_accepted_tokens=1)
    assert s.schedule().running == (SequenceDelta("a", 4, (8, 9), 5, (9,)),)


def test_reported_cached_counts_override_the_defaults():
    s = sched()
    s.add(req("a", prompt_len=3))
    s.schedule()
    s.commit("a", [7, 8], num_draft_tokens=2, draft_cached=1, target_cached=2)
    assert s.schedule().running == (SequenceDelta("a", 1, (101, 102, 7, 8), 2, (102, 7, 8)),)


def test_a_draft_keeping_its_chain_is_trusted_for_the_accepted_nodes_only():
    s = sched()
    s.add(req("a", prompt_len=3))
    s.schedule()
    # the draft fed 4 chain nodes (3 + 4 = 7 cached); the verifier accepted 2, then its own 9
    s.commit("a", [7, 8, 9], num_draft_tokens=5, num_accepted_tokens=2, draft_cached=7)
    assert s.schedule().running == (SequenceDelta("a", 5, (9,), 5, (9,)),)


def test_plan_deltas_cover_new_sequences_with_nothing_cached():
    s = sched()
    s.add(req("a", prompt_len=2))
    s.schedule()
    s.commit("a", [5])
    s.add(req("b", prompt_len=2))
    plan = s.schedule()
    assert plan.deltas() == (SequenceDelta("a", 0, (100, 101, 5), 2, (5,)),
                             SequenceDelta("b", 0, (100, 101), 0, (100, 101)))
    assert plan.sequence_ids == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.new = ()


# -- retirement --------------------------------------------------------------------------------
def test_finished_ids_go_out_exactly_once():
    s = sched()
    s.add(req("a"))
    s.add(req("b"))
    s.schedule()
    s.finish("a", "stop")
    assert s.schedule().finished_sequence_ids == ("a",)
    assert s.schedule().finished_sequence_ids == ()
    s.finish("b", "cancelled")
    plan = s.schedule()
    assert plan.finished_sequence_ids == ("b",) and plan.is_empty
    assert s.schedule().finished_sequence_ids == ()
    assert not s.has_work


def test_a_request_cancelled_while_waiting_is_not_released():
    s = sched(max_running=1)
    s.add(req("a"))
    s.add(req("b"))
    s.schedule()
    gone = s.finish("b", "cancelled")  # never reached a service
    assert gone.finish_reason == "cancelled"
    assert s.schedule().finished_sequence_ids == ()
    assert "b" not in s and s.waiting_ids == []


def test_eos_cuts_the_round_and_retires():
    s = sched()
    s.add(req("a", prompt_len=2))
    s.schedule()
    out = s.commit("a", [7, EOS, 9])
    assert out == CommitResult((7, EOS), "eos")
    assert "a" not in s and s.running_ids == []
    assert s.schedule().finished_sequence_ids == ("a",)


def test_ignore_eos_keeps_going():
    s = sched()
    s.add(req("a", prompt_len=2, ignore_eos=True))
    s.schedule()
    assert s.commit("a", [7, EOS, 9]) == CommitResult((7, EOS, 9), None)


def test_max_new_tokens_cuts_the_round_and_retires():
    s = sched()
    s.add(req("a", prompt_len=2, max_new=4))
    s.schedule()
    assert s.commit("a", [5, 6]) == CommitResult((5, 6), None)
    s.schedule()
    assert s.commit("a", [7, 8, 9]) == CommitResult((7, 8), "length")
    assert s.schedule().finished_sequence_ids == ("a",)


def test_length_wins_when_eos_is_cut_off():
    s = sched()
    s.add(req("a", max_new=1))
    s.schedule()
    assert s.commit("a", [7, EOS]) == CommitResult((7,), "length")


# -- NOT_FOUND and RESOURCE_EXHAUSTED ----------------------------------------------------------
def test_not_found_resends_the_full_context_to_that_side_only():
    s = sched()
    s.add(req("a", prompt_len=3))
    s.schedule()
    s.commit("a", [7, 8], num_draft_tokens=1)
    s.schedule()
    s.reset_remote("a", "target")
    assert s.schedule().running == (SequenceDelta("a", 3, (7, 8), 0, (100, 101, 102, 7, 8)),)
    s.reset_remote("a", "draft")
    assert s.schedule().running[0].draft_num_cached == 0
    s.commit("a", [9], num_draft_tokens=1)
    s.reset_remote("a", "both")
    full = (100, 101, 102, 7, 8, 9)
    assert s.schedule().running == (SequenceDelta("a", 0, full, 0, full),)
    with pytest.raises(ValueError, match="side"):
        s.reset_remote("a", "cache")


def test_requeue_keeps_tokens_goes_first_and_caps_admission():
    s = sched(max_running=8, relax=2)
    for rid in "abc":
        s.add(req(rid, prompt_len=2))
    s.schedule()
    for rid in "abc":
        s.commit(rid, [5])
    s.requeue("b")  # RESOURCE_EXHAUSTED
    s.add(req("d"))
    assert s.waiting_ids == ["b", "d"]
    assert s.admission_cap == 2
    plan = s.schedule()  # a and c still run; nobody is admitted
    assert ids(plan) == ([], ["a", "c"])
    s.finish("c", "stop")
    plan = s.schedule()  # room for one: b comes back as a delta, tokens intact
    assert ids(plan) == ([], ["a", "b"])
    assert plan.running[1] == SequenceDelta("b", 0, (100, 101, 5), 2, (5,))
    assert s.get("b").token_ids == [100, 101, 5]
    assert s.waiting_ids == ["d"]
    assert ids(s.schedule()) == (["d"], ["a", "b"])  # 2 quiet rounds: cap 3


def test_admission_cap_relaxes_back_to_max_running():
    s = sched(max_running=3, relax=1)
    for rid in "abc":
        s.add(req(rid))
    s.schedule()
    s.requeue("c")
    s.requeue("b")
    assert s.admission_cap == 1
    assert ids(s.schedule()) == ([], ["a"])  # no quiet round yet
    assert ids(s.schedule()) == ([], ["a", "b"])  # 1 quiet round: cap 2
    assert ids(s.schedule()) == ([], ["a", "b", "c"])  # 1 more: cap 3 = max, lifted
    assert s.admission_cap == 3


def test_a_lone_requeued_sequence_is_retried():
    s = sched()
    s.add(req("a"))
    s.schedule()
    s.requeue("a")
    assert s.admission_cap == 1
    assert ids(s.schedule()) == ([], ["a"])


# -- draft budgets -----------------------------------------------------------------------------
def test_spec_lengths_are_capped_by_request_and_tokens_left():
    s = sched()
    s.add(req("a", spec=4, max_new=16))
    s.add(req("b", spec=4, max_new=3))  # at most 3 tokens: 2 drafts + the bonus
    s.add(req("c", spec=0))
    s.add(req("d", spec=4, max_new=1))
    plan = s.schedule()
    assert plan.spec_lengths == (("a", 4), ("b", 2), ("c", 0), ("d", 0))
    assert plan.spec_length("b") == 2
    assert plan.num_batch_tokens == 4 * 3 + 6


def test_spec_lengths_are_cut_to_the_room_left():
    s = sched(max_batch_tokens=13)
    for rid in "abc":
        s.add(req(rid, prompt_len=2, spec=4))
    plan = s.schedule()  # 6 step tokens, room 7 for 12 wanted: 3, 2, 2
    assert plan.spec_lengths == (("a", 3), ("b", 2), ("c", 2))
    assert plan.num_batch_tokens == 13


class FakePolicy:
    def __init__(self, k: int):
        self.k = k
        self.calls = []
        self.forgotten = []

    def choose(self, seq_id, batch_tokens, batch_size, draft_lag=1, tokens_left=None):
        self.calls.append((seq_id, batch_tokens, batch_size, draft_lag, tokens_left))
        return self.k

    def forget(self, seq_id):
        self.forgotten.append(seq_id)


def test_policy_chooses_within_the_request_cap():
    policy = FakePolicy(k=6)
    s = sched(policy=policy)
    s.add(req("a", prompt_len=3, spec=4))
    s.add(req("b", prompt_len=5, spec=8))
    s.add(req("c", prompt_len=1, spec=0))  # never asked
    plan = s.schedule()
    assert plan.spec_lengths == (("a", 4), ("b", 6), ("c", 0))
    # judged at the batch's decoding size (one token a sequence), not its prompts' 9 tokens;
    # each one's draft has not seen its prompt yet (the lag) and has all its tokens left
    assert policy.calls == [("a", 3, 3, 3, 16), ("b", 3, 3, 5, 16)]
    s.commit("a", [EOS])
    assert policy.forgotten == ["a"]


def test_bad_requests_and_config_are_rejected():
    s = sched()
    s.add(req("a"))
    with pytest.raises(ValueError, match="request_id"):
        s.add(req("a"))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SequenceRequest("x", (), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SequenceRequest("x", (1,), 0)
    with pytest.raises(ValueError, match="max_running"):
        SchedulerConfig(max_running=0)
    with pytest.raises(ValueError, match="not running"):
        s.commit("a", [1])  # still waiting
