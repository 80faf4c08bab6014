"""Priority classes in the scheduler: exact admission, sharing, budgets, preemption, limits."""

from __future__ import annotations

import pytest

from specmesh.clients.priority import ClassLimits
from specmesh.clients.scheduler import Scheduler, SchedulerConfig, SequenceRequest, StepPlan
from specmesh.errors import CapacityExhausted, InvalidRequest

EOS = 2


def req(rid: str, priority: str = "interactive", prompt_len: int = 3, spec: int = 0
        ) -> SequenceRequest:
    prompt = tuple(100 + i for i in range(prompt_len))
    return SequenceRequest(rid, prompt, 64, eos_token_id=EOS, max_spec_tokens=spec,
                           priority=priority)


def sched(max_running=64, max_batch_tokens=2048, window=100, **batch) -> Scheduler:
    return Scheduler(SchedulerConfig(max_running, max_batch_tokens, batch=ClassLimits(**batch),
                                     interactive_window_rounds=window))


def planned(plan: StepPlan) -> list[str]:
    return [n.seq_id for n in plan.new] + [d.seq_id for d in plan.running]


def step(s: Scheduler, plan: StepPlan) -> None:
    """Every planned sequence commits one token (target-only round)."""
    for seq_id in planned(plan):
        s.commit(seq_id, [7])


def test_interactive_is_admitted_before_batch_that_arrived_earlier():
    s = sched(max_running=2)
    for rid in ("b1", "b2"):
        s.add(req(rid, "batch"))
    s.add(req("i1"))
    assert s.waiting_ids == ["i1", "b1", "b2"]
    plan = s.schedule()
    assert [n.seq_id for n in plan.new] == ["i1", "b1"] and s.waiting_ids == ["b2"]


def test_an_interactive_request_takes_the_latest_batch_slot():
    s = sched(max_running=2)
    for rid in ("b1", "b2"):
        s.add(req(rid, "batch"))
    step(s, s.schedule())
    s.add(req("i1"))
    plan = s.schedule()
    assert planned(plan) == ["i1", "b1"]
    assert plan.finished_sequence_ids == ("b2",)  # its KV is freed; it recomputes later
    assert s.waiting_ids == ["b2"] and s.get("b2").target_cached == 0
    step(s, plan)
    s.finish("i1", "stop")
    plan = s.schedule()  # b2 comes back with its full context, its tokens kept
    assert [d.seq_id for d in plan.running] == ["b1", "b2"]
    assert plan.running[1].target_num_cached == 0 and len(plan.running[1].target_new_tokens) == 4


def test_batch_fills_what_interactive_work_leaves_in_turn():
    s = sched(max_round_tokens=2, window=2)
    for rid in ("b1", "b2", "b3", "b4"):
        s.add(req(rid, "batch"))
    step(s, s.schedule())  # alone, every batch sequence runs
    s.add(req("i1"))
    rounds = []
    for _ in range(3):
        plan = s.schedule()
        rounds.append(planned(plan))
        step(s, plan)
    # i1's prompt is 3 tokens; batch get 2 tokens a round (1 each), least recently run first
    assert rounds == [["i1", "b1", "b2"], ["i1", "b3", "b4"], ["i1", "b1", "b2"]]
    assert s.num_running == 5  # the ones that sat out keep their place (and their KV)
    s.finish("i1", "stop")
    plan = s.schedule()  # interactive work was one round ago: batch keeps to its share
    assert planned(plan) == ["b3", "b4"]
    step(s, plan)
    assert sorted(planned(s.schedule())) == ["b1", "b2", "b3", "b4"]  # the window has passed


def test_batch_is_not_admitted_past_its_round_share():
    s = sched(max_round_tokens=4)
    s.add(req("i1"))
    s.add(req("b1", "batch", prompt_len=3))
    s.add(req("b2", "batch", prompt_len=3))
    assert planned(s.schedule()) == ["i1", "b1"]  # b2's 3 tokens would pass the 4 left


def test_draft_budgets_go_to_interactive_first():
    s = sched(max_batch_tokens=14, max_round_tokens=2048)
    s.add(req("b1", "batch", spec=8))
    s.add(req("i1", spec=8))
    plan = s.schedule()
    assert dict(plan.spec_lengths) == {"i1": 8, "b1": 0}  # 6 prompt tokens leave 8
    step(s, plan)
    plan = s.schedule()
    assert dict(plan.spec_lengths) == {"i1": 8, "b1": 4}  # 2 step tokens leave 12


def test_out_of_room_preempts_batch_for_interactive_and_itself_otherwise():
    s = sched()
    for r in (req("b1", "batch"), req("b2", "batch"), req("i1")):
        s.add(r)
    step(s, s.schedule())
    assert s.preempt_for("i1") == "b2" and "i1" in s.running_ids
    assert s.waiting_ids == ["b2"]
    assert s.preempt_for("b1") == "b1" and s.running_ids == ["i1"]


def test_per_class_running_and_queue_limits():
    s = Scheduler(SchedulerConfig(batch=ClassLimits(max_running=1, max_queued=2)))
    s.add(req("b1", "batch"))
    s.add(req("b2", "batch"))
    with pytest.raises(CapacityExhausted, match="priority: the batch queue is full"):
        s.add(req("b3", "batch"))
    s.add(req("i1"))  # the interactive queue is its own
    assert planned(s.schedule()) == ["i1", "b1"]
    assert s.waiting_ids == ["b2"]  # batch.max_running = 1


def test_limits_validate_and_come_from_config_tables():
    cfg = SchedulerConfig(batch={"max_running": 4, "max_round_tokens": 8})
    assert cfg.batch == ClassLimits(max_running=4, max_round_tokens=8)
    with pytest.raises(ValueError, match="max_queued"):
        SchedulerConfig(interactive={"max_queued": 0})
    with pytest.raises(TypeError):
        SchedulerConfig(batch={"max_runing": 4})
    with pytest.raises(InvalidRequest, match="priority"):
        req("x", "urgent")


def test_batch_admission_never_passes_the_round_budget():
    s = sched(max_batch_tokens=8, max_round_tokens=2048)
    s.add(req("i1", prompt_len=6))
    s.add(req("b1", "batch", prompt_len=3))
    assert planned(s.schedule()) == ["i1"]  # 6 + 3 > 8, however large batch's own share
