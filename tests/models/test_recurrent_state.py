"""Recurrent state slots in the runner: a prefill resumed from a slot at a multiple of RECURRENT_CHUNK
matches the unsplit prefill, and state copies and snapshots move exactly the slots named."""
from __future__ import annotations

import pytest
import torch

from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from reprise.engine.request import Request, SamplingParams
from reprise.engine.plan import StepPlan
from reprise.models.layers.gated_delta import RECURRENT_CHUNK
from tests.models.helpers import chunk_item
from tests.models.test_hybrid_logits import CASES, tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5")
    config_cls, model_cls, options, *_ = CASES["qwen3_5"]
    tiny_model(path, config_cls, model_cls, options)
    return Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16))


ACQUIRED: dict[str, int | None] = {}      # the slot the cache handed out, if any, given back at the end


def start(engine: Engine, ids: list[int], slot: int) -> Request:
    """A request working in state slot `slot` (chosen here, so the test knows which slots it touches)."""
    request = Request(ids, SamplingParams(temperature=0))
    request.cache, _ = engine.cache.acquire(engine.cache.match([], None), None)
    ACQUIRED[request.request_id] = request.cache.state_slot
    request.cache.state_slot = slot
    assert engine.cache.allocate(request.cache, len(ids))
    return request


def prefill(engine: Engine, request: Request, num_tokens: int, **plan) -> torch.Tensor:
    logits, *_ = engine.runner.forward(StepPlan((chunk_item(request, num_tokens),), (), (), **plan))
    request.num_computed += num_tokens
    return logits[0]


def finish(engine: Engine, *requests: Request) -> None:
    for request in requests:
        request.cache.state_slot = ACQUIRED.pop(request.request_id)
        engine.cache.release(request.cache, [])


def test_prefill_resumed_from_a_slot_matches_the_unsplit_prefill(engine):
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    whole, split = start(engine, ids, slot=0), start(engine, ids, slot=1)
    whole_logits = prefill(engine, whole, 150)
    prefill(engine, split, 2 * RECURRENT_CHUNK)
    split_logits = prefill(engine, split, 150 - 2 * RECURRENT_CHUNK)
    conv, recurrent = engine.runner.states
    # the first layer's state sees only embeddings: the same arithmetic, bit for bit
    assert torch.equal(recurrent[0, 0], recurrent[0, 1]) and torch.equal(conv[0, 0], conv[0, 1])
    # later layers read the attention layer, whose chunked prefill may round differently
    assert torch.allclose(recurrent[:, 0], recurrent[:, 1], rtol=1e-5, atol=1e-9)
    assert torch.allclose(whole_logits, split_logits, rtol=1e-5, atol=1e-7)
    finish(engine, whole, split)


def test_state_copies_and_snapshots_move_exactly_the_named_slots(engine):
    states = engine.runner.states
    num_slots = states[0].shape[1]
    for tensor in states:
        for slot in range(num_slots):
            tensor[:, slot] = slot + 1
    ids = list(range(RECURRENT_CHUNK))
    request = start(engine, ids, slot=0)
    prefill(engine, request, RECURRENT_CHUNK, state_copies=((3, 1),), state_snapshots=((0, 2),))
    for tensor in states:
        assert tensor[:, 0].abs().sum() > 0 and not (tensor[:, 0] == 1).any()   # the chunk's own state
        assert (tensor[:, 1] == 4).all() and (tensor[:, 3] == 4).all()      # restored before, source kept
        assert torch.equal(tensor[:, 2], tensor[:, 0])                      # snapshot of the new state
        assert all((tensor[:, slot] == slot + 1).all() for slot in range(4, num_slots))
    # slot 0 was zeroed before a chunk from position 0: its result does not depend on what it held
    again = start(engine, ids, slot=5)
    prefill(engine, again, RECURRENT_CHUNK)
    for tensor in states:
        assert torch.equal(tensor[:, 5], tensor[:, 0])
    finish(engine, request, again)
