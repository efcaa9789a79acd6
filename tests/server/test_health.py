"""The engine thread's liveness, the waiting count and the tenant salts, with a stand-in engine (no model)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from reprise.engine.async_engine import AsyncEngine, EngineDead
from reprise.engine.request import SamplingParams
from reprise.server.app import create_app
from reprise.server.config import key_salt, parse_api_keys, tenant_cache_salt


class StandInEngine:
    """Just enough Engine for AsyncEngine and create_app: added requests wait (never run), adds
    block while `admitting` is clear, and abort breaks the engine thread (an unexpected failure)."""

    def __init__(self):
        self.scheduler = SimpleNamespace(waiting=deque())
        self.has_work = False
        self.tokenizer = SimpleNamespace(chat_template=None, encode=lambda text: [], is_special=lambda token: False)
        self.model_config = SimpleNamespace(name="stand-in")
        self.model_path = "stand-in"
        self.config = SimpleNamespace(model=None)
        self.max_model_len = 64
        self.replica_id = None
        self.admitting = threading.Event()
        self.admitting.set()

    def check_prompt(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        pass

    def add_request(self, prompt_ids, params, salt, request_id, pins=()) -> None:
        self.admitting.wait(10)
        self.scheduler.waiting.append(request_id)

    def abort(self, request_id: str) -> None:
        raise RuntimeError("broken engine")


@pytest.fixture
def stand_in():
    async_engine = AsyncEngine(StandInEngine())
    yield async_engine
    async_engine.shutdown(timeout=5)


def wait_dead(async_engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 5
    while async_engine.is_alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not async_engine.is_alive


def test_health_is_503_once_the_engine_thread_is_dead(stand_in):
    with TestClient(create_app(stand_in)) as client:
        assert client.get("/health").json() == {"status": "ok", "per_key_namespaces": False}
        stand_in.abort("any")                   # the stand-in's abort raises: the thread ends
        wait_dead(stand_in)
        response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_dead"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_dead_engine_thread_ends_every_stream_and_refuses_new_ones(stand_in):
    async def scenario():
        stream = stand_in.generate([1, 2, 3], SamplingParams(max_tokens=2))
        while stand_in.num_waiting != 1 or stand_in.engine.scheduler.waiting == deque():
            await asyncio.sleep(0.01)
        stand_in.abort("any")
        with pytest.raises(EngineDead):
            await stream.__anext__()
        wait_dead(stand_in)
        with pytest.raises(EngineDead):
            stand_in.generate([1], SamplingParams(max_tokens=1))
    asyncio.run(scenario())


def test_num_waiting_counts_adds_not_yet_taken_and_the_scheduler_queue(stand_in):
    async def scenario():
        stand_in.engine.admitting.clear()       # the engine thread blocks inside the first add
        for _ in range(3):
            stand_in.generate([1, 2], SamplingParams(max_tokens=1))
        assert stand_in.num_waiting == 3        # one being added, two still queued
        stand_in.engine.admitting.set()
        while len(stand_in.engine.scheduler.waiting) < 3:
            await asyncio.sleep(0.01)
        assert stand_in.num_waiting == 3        # all three in the scheduler's queue now
    asyncio.run(scenario())


def test_api_keys_come_from_flags_or_env_comma_separated():
    assert parse_api_keys(["a", "b,c", "a"], "env") == ("a", "b", "c")
    assert parse_api_keys(None, "x, y") == ("x", "y")
    assert parse_api_keys(None, None) == ()


def test_key_salts_hide_the_key_and_combine_with_the_client_salt():
    salt_a, salt_b = key_salt("key-a"), key_salt("key-b")
    assert salt_a != salt_b and "key-a" not in salt_a and len(salt_a) == len(salt_b) == 64
    assert tenant_cache_salt(salt_a, None) == salt_a
    assert tenant_cache_salt(salt_a, "s") == f"{salt_a}:s" != tenant_cache_salt(salt_b, "s")
    assert tenant_cache_salt(None, "s") == "s" and tenant_cache_salt(None, None) is None
