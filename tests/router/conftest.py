"""Router fixtures: one real redis-server per run (tests/tiers/redis_server.py)."""
from __future__ import annotations

import pytest

from tests.server.conftest import fresh_prompt  # noqa: F401  (prompts no other test sends)
from tests.tiers.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.client().flushdb()
    return redis_server.url
