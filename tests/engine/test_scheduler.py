"""The scheduler alone: no weights, no torch. Each step is fed a fake model output (token 7 for
every sampling request), as the engine would feed what the runner sampled."""
from __future__ import annotations

import subprocess
import sys

from reprise.cache.invariants import check_manager
from reprise.cache.manager import CacheManager
from reprise.engine.request import Request, RequestStatus, SamplingParams
from reprise.engine.scheduler import Scheduler

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
    assert plan.prefills == () and plan.decodes == (request,)
    assert request.output_ids == [7] and request.num_computed == 23


def test_decodes_go_first_and_prefills_share_what_is_left():
    scheduler = make(budget=10)
    first, second = add(scheduler, range(100, 103)), add(scheduler, range(200, 203))
    assert [chunk.num_tokens for chunk in step(scheduler).prefills] == [2, 2]
    late = add(scheduler, range(300, 330))
    plan = step(scheduler)
    assert plan.decodes == (first, second)
    assert [(chunk.request, chunk.num_tokens) for chunk in plan.prefills] == [(late, 8)]   # (10 - 2) on the grid


def test_the_latest_admitted_request_is_preempted_first_and_waits_first_in_line():
    scheduler = make(num_blocks=4, budget=20)
    first, second = add(scheduler, range(100, 108)), add(scheduler, range(200, 208))
    step(scheduler)                                      # 7 tokens each: two blocks each, the pool is full
    step(scheduler)                                      # position 7 still fits the second block
    plan = step(scheduler)                               # position 8 needs a third block for `first`
    assert plan.decodes == (first,)
    assert second.status is RequestStatus.WAITING and scheduler.waiting[0] is second
    assert second.num_preemptions == 1 and second.num_computed == 0
    assert first.output_ids == [7, 7]


def test_a_prefix_being_computed_defers_the_request_that_shares_it():
    scheduler = make(budget=64)
    shared = list(range(100, 120))
    first, second = add(scheduler, shared + [1, 2]), add(scheduler, shared + [3, 4])
    plan = step(scheduler)
    assert [chunk.request for chunk in plan.prefills] == [first]
    assert list(scheduler.waiting) == [second]
    plan = step(scheduler)                               # first's prompt is in the index now
    assert [(chunk.request, chunk.num_tokens) for chunk in plan.prefills] == [(second, 1)]
    assert second.cached_tokens == 20
