"""A batch that fails ends its own requests with a 503 and the server serves on (fault injection)."""
from __future__ import annotations

import httpx

from tests.server.helpers import kv_blocks, launch, wait_idle, write_tiny_model


def test_failed_batches_end_their_requests_and_the_server_serves_on(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    with launch([str(model), "--dtype", "float32", "--kv-cache-bytes", "16MiB", "--inject-fault-every", "5"]) as running:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            statuses = []
            for n in range(12):
                body = {"prompt": f"request {n}", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
                response = http.post("/v1/completions", json=body)
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert "injected fault" in response.json()["error"]["message"]
                else:
                    assert response.json()["usage"]["completion_tokens"] == 3
            assert set(statuses) == {200, 503} and statuses.count(503) >= 2
            assert http.get("/health").status_code == 200
            assert wait_idle(http)["used"] == 0
            check = http.get("/v1/cache/check").json()
            assert check["ok"], check
            assert sum(kv_blocks(http).values()) == check["num_blocks"]
