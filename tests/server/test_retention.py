"""Retention through the API: a prefix pinned by an Anthropic `cache_control` breakpoint with a
1h TTL outlives a flood that evicts everything unpinned from a small pool (a tiny model, 48 blocks
of 16 tokens). That a pin ends at its TTL is tested on the cache itself (tests/cache/test_pins.py,
with a clock the test moves)."""
from __future__ import annotations

import random

import anthropic
import httpx

from tests.conftest import WORDS
from tests.server.helpers import launch, metric, write_tiny_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def text(seed: int, num_words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def test_a_pinned_prefix_survives_a_flood_that_evicts_the_rest(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    # the tiny model's KV: 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 4 bytes = 4 KiB a block
    flags = [str(model), "--chat-template", str(template), "--dtype", "float32", "--kv-cache-bytes", "192KiB"]
    with launch(flags) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        claude = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0)
        system = [{"type": "text", "text": text(1, 160), "cache_control": {"type": "ephemeral", "ttl": "1h"}}]

        def ask():
            return claude.messages.create(model="default", max_tokens=1, system=system,
                                          messages=[{"role": "user", "content": "Go on."}],
                                          extra_body={"temperature": 0, "cache_report": True})

        first = ask()
        [point] = first.model_extra["cache"]["breakpoints"]
        unpinned = {"prompt": text(2, 150), "max_tokens": 1, "temperature": 0}
        http.post("/v1/completions", json=unpinned)
        assert metric(http, "reprise:kv_blocks_pinned") == -(-point["tokens"] // 16)
        evictions = metric(http, "reprise:prefix_cache_evictions_total")
        for seed in range(10, 20):                  # 10 x ~200 tokens through a 768-token pool
            http.post("/v1/completions", json={"prompt": text(seed, 150), "max_tokens": 1, "temperature": 0})
        assert metric(http, "reprise:prefix_cache_evictions_total") - evictions >= 40
        again = http.post("/v1/completions", json={**unpinned, "cache_report": True}).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0       # the unpinned one is gone
        assert ask().usage.cache_read_input_tokens >= point["tokens"]              # the pinned prefix is not
