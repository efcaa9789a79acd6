"""The scheduler alone: no weights, no torch. Each step is fed a fake model output (token 7 for
every sampling request), as the engine would feed what the runner sampled."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

from reprise.cache.invariants import check_manager
from reprise.cache.manager import CacheManager
from reprise.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from reprise.engine.scheduler import Scheduler
from reprise.engine.speculative import NgramDrafter

BLOCK_SIZE = 4
PARAMS = SamplingParams(temperature=0, max_tokens=100)


def make(num_blocks: int = 32, budget: int = 10, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(CacheManager(num_blocks, BLOCK_SIZE), BLOCK_SIZE, max_num_seqs, budget)


def add(scheduler: Scheduler, prompt_ids) -> Request:
    request = Request(list(prompt_ids), PARAMS)
    scheduler.add(request)
    return request


def step(scheduler: Scheduler):
    plan = scheduler.schedule()
    scheduler.update(plan, [[7]] * (len(plan.verifies) + len(plan.decodes)))
    check_manager(scheduler.cache)
    return plan


def test_scheduler_module_imports_no_torch():
    code = "import sys, reprise.engine.scheduler; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_long_prompt_is_chunked_on_the_block_grid_and_its_last_token_decodes():
    scheduler = make(budget=10)
    request = add(scheduler, range(100, 123))           # 23 tokens: 22 prefilled, the last decoded
    sizes = [[chunk.num_tokens for chunk in step(scheduler).prefills] for _ in range(3)]
    assert sizes == [[8], [8], [6]]                      # 10 // 4 * 4, again, then all that is left
    plan = step(scheduler)
    assert plan.prefills == () and plan.request_ids == [request.request_id]
    assert request.output_ids == [7] and request.num_computed == 23


def test_decodes_go_first_and_prefills_share_what_is_left():
    scheduler = make(budget=10)
    first, second = add(scheduler, range(100, 103)), add(scheduler, range(200, 203))
    assert [chunk.num_tokens for chunk in step(scheduler).prefills] == [2, 2]
    late = add(scheduler, range(300, 330))
    plan = step(scheduler)
    assert [item.request_id for item in plan.decodes] == [first.request_id, second.request_id]
    assert [(c.request_id, c.num_tokens) for c in plan.prefills] == [(late.request_id, 8)]   # (10 - 2) on the grid


def test_the_latest_admitted_request_is_preempted_first_and_waits_first_in_line():
    scheduler = make(num_blocks=4, budget=20)
    first, second = add(scheduler, range(100, 108)), add(scheduler, range(200, 208))
    step(scheduler)                                      # 7 tokens each: two blocks each, the pool is full
    step(scheduler)                                      # position 7 still fits the second block
    plan = step(scheduler)                               # position 8 needs a third block for `first`
    assert plan.request_ids == [first.request_id]
    assert second.status is RequestStatus.WAITING and scheduler.waiting[0] is second
    assert second.num_preemptions == 1 and second.num_computed == 0
    assert first.output_ids == [7, 7]


def test_a_prefix_being_computed_defers_the_request_that_shares_it():
    scheduler = make(budget=64)
    shared = list(range(100, 120))
    first, second = add(scheduler, shared + [1, 2]), add(scheduler, shared + [3, 4])
    plan = step(scheduler)
    assert plan.request_ids == [first.request_id]
    assert list(scheduler.waiting) == [second]
    plan = step(scheduler)                               # first's prompt is in the index now
    assert [(chunk.request_id, chunk.num_tokens) for chunk in plan.prefills] == [(second.request_id, 1)]
    assert second.cached_tokens == 20


def is_plain(value) -> bool:
    """Ints, strings, None, tuples of them and frozen dataclasses of them: nothing live or mutable."""
    if value is None or isinstance(value, (int, str)):
        return True
    if isinstance(value, tuple):
        return all(is_plain(v) for v in value)
    return (dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen
            and all(is_plain(getattr(value, f.name)) for f in dataclasses.fields(value)))


def follow(tables: dict[str, list], plan) -> None:
    """The runner's side of a plan's block ids (plan.Scheduled's contract)."""
    for request_id in plan.dropped:
        del tables[request_id]
    for item in plan.items:
        table = tables.setdefault(item.request_id, [])
        table[item.num_kept_blocks:] = item.new_block_ids
        table[:item.num_released_blocks] = [None] * item.num_released_blocks


def test_the_plan_is_plain_data_and_its_block_ids_keep_the_runner_in_step_across_preemption():
    scheduler = make(num_blocks=4, budget=20)
    first, second = add(scheduler, range(100, 108)), add(scheduler, range(200, 208))
    tables, plans = {}, []
    for _ in range(3):
        plans.append(step(scheduler))
        follow(tables, plans[-1])
        assert tables == {r.request_id: r.cache.block_table for r in scheduler.running}
    assert all(is_plain(plan) for plan in plans)
    assert [(i.request_id, i.token_ids, i.start, i.num_kept_blocks, len(i.new_block_ids)) for i in plans[0].items] \
        == [(first.request_id, tuple(range(100, 107)), 0, 0, 2), (second.request_id, tuple(range(200, 207)), 0, 0, 2)]
    assert [(i.token_ids, i.start, i.num_kept_blocks, i.new_block_ids) for i in plans[1].items] \
        == [((107,), 7, 2, ()), ((207,), 7, 2, ())]          # position 7 still lies in the second block
    assert plans[2].dropped == (second.request_id,)          # preempted for first's third block
    assert [(i.token_ids, i.start, i.num_kept_blocks, i.new_block_ids) for i in plans[2].items] \
        == [((7,), 8, 2, (first.cache.block_table[2],))]
    scheduler.finish(first, FinishReason.LENGTH)
    plan = step(scheduler)                                   # second resumes: its whole table is sent again
    follow(tables, plan)
    assert plan.dropped == (first.request_id,) and plan.request_ids == [second.request_id]
    assert plan.items[0].num_kept_blocks == 0 and tables == {second.request_id: second.cache.block_table}


def test_block_ids_follow_verifies_whose_rejected_drafts_give_blocks_back():
    drafter = NgramDrafter(num_draft_tokens=6, ngram_max=3, ngram_min=1)
    scheduler = Scheduler(CacheManager(64, BLOCK_SIZE), BLOCK_SIZE, 8, 32, drafter=drafter)
    request = add(scheduler, [1, 2, 3, 7, 1, 2, 3, 7, 1, 2])    # drafts 3, 7, 1, 2, 3, 7; the model says 7
    tables, num_verifies = {}, 0
    for _ in range(6):
        plan = scheduler.schedule()
        follow(tables, plan)              # before update: a verify holds blocks for all its drafts
        assert tables == {request.request_id: request.cache.block_table} and is_plain(plan)
        scheduler.update(plan, [[7]] * (len(plan.verifies) + len(plan.decodes)))
        num_verifies += len(plan.verifies)
    assert num_verifies > 0 and request.output_ids[0] == 7
