"""Through `reprise route`: interleaved conversations keep a single server's hit rate (round-robin
without the shared tier does not), and requests keep succeeding when Redis or a replica dies.

Several servers on a small machine are slow: these run with `-m slow`."""
from __future__ import annotations

import random

import httpx
import pytest

from reprise.router.proxy import ROUTE_HEADER
from tests.router.cluster import cached, chat, replica, router
from tests.server.helpers import stop
from tests.tiers.redis_server import RedisServer

pytestmark = pytest.mark.slow

NUM_CONVERSATIONS = 5        # odd, so round-robin over 2 replicas moves each conversation between turns
NUM_TURNS = 3
WORDS = "river stone light garden window paper music signal harbor forest winter silver castle ocean letter".split()


@pytest.fixture(scope="module")
def redis_alone():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(redis_alone):
    """Replicas a, b on the module's own Redis (killed by a test), c, d with no shared tier."""
    with replica(redis_alone.url) as a, replica(redis_alone.url) as b, replica(None) as c, replica(None) as d:
        yield {"a": a, "b": b, "c": c, "d": d}


def text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def conversations_hit_rate(url: str, seed: str) -> float:
    """NUM_CONVERSATIONS conversations of NUM_TURNS turns, interleaved, each resending its history:
    cached / prompt tokens over all of them (every first turn is new content)."""
    rng = random.Random(seed)
    histories = [[{"role": "user", "content": f"{seed} {i} " + text(rng, 150)}] for i in range(NUM_CONVERSATIONS)]
    num_cached = num_prompt = 0
    for turn in range(NUM_TURNS):
        for history in histories:
            answer = chat(url, history, max_tokens=12)
            hit, total = cached(answer)
            num_cached, num_prompt = num_cached + hit, num_prompt + total
            history += [answer.json()["choices"][0]["message"], {"role": "user", "content": text(rng, 20)}]
    return num_cached / num_prompt


def test_routed_conversations_hit_like_one_server(cluster, redis_alone):
    single = conversations_hit_rate(cluster["a"].url, "single")
    with router([cluster["a"].url, cluster["b"].url], "--kv-store", redis_alone.url) as running:
        routed = conversations_hit_rate(running.url, "routed")
        metrics = httpx.get(f"{running.url}/metrics").text
    with router([cluster["c"].url, cluster["d"].url], "--policy", "round-robin") as running:
        round_robin = conversations_hit_rate(running.url, "round-robin")
    print(f"hit rate: single server {single:.3f}, routed {routed:.3f}, round-robin without the shared tier "
          f"{round_robin:.3f}")
    assert abs(routed - single) <= 0.02
    assert round_robin < single - 0.15
    assert 'reprise:router_decisions_total{reason="prefix"}' in metrics


def test_requests_succeed_while_redis_is_dead(cluster, redis_alone):
    rng = random.Random("redis outage")
    history = [{"role": "user", "content": text(rng, 100)}]
    with router([cluster["a"].url, cluster["b"].url], "--kv-store", redis_alone.url) as running:
        chat(running.url, history)
        redis_alone.kill()
        for _ in range(3):
            answer = chat(running.url, history)               # from the local tiers
            history += [answer.json()["choices"][0]["message"], {"role": "user", "content": text(rng, 10)}]
        assert cached(answer)[0] > 0
        fresh = chat(running.url, [{"role": "user", "content": text(rng, 100)}], stream=False)
        assert fresh.status_code == 200
        redis_alone.start()
        assert chat(running.url, history).status_code == 200
    for name in ("a", "b"):
        assert "kv store" in cluster[name].log() and "unavailable" in cluster[name].log()
    errors = [line for line in httpx.get(f"{cluster['a'].url}/metrics").text.splitlines()
              if line.startswith('reprise:tier_errors_total{tier="store"}')]
    assert errors and float(errors[0].split()[-1]) >= 1


def test_router_answers_from_the_others_when_a_replica_dies(cluster, redis_alone):
    rng = random.Random("replica outage")
    with router([cluster["a"].url, cluster["b"].url], "--kv-store", redis_alone.url) as running:
        for _ in range(2):
            chat(running.url, [{"role": "user", "content": text(rng, 40)}])
        stop(cluster["b"].process)
        answers = [chat(running.url, [{"role": "user", "content": text(rng, 40)}]) for _ in range(6)]
        assert {answer.headers[ROUTE_HEADER].split()[0] for answer in answers} == {cluster["a"].url}
        health = httpx.get(f"{running.url}/health").json()
        assert health["replicas"] == [cluster["a"].url]
