"""Tenants by default: several API keys are several cache namespaces, the admin key alone sees across
them, and --shared-cache (with its warning) is the only way to share. One tiny random-weight model
serves two keys and an admin key; a second server of it runs with --shared-cache."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from reprise.server.config import key_salt
from reprise.server.dashboard.ledger import namespace_label
from tests.server.helpers import launch, wait_idle, write_tiny_model
from tests.server.test_errors import assert_error

KEY_A, KEY_B, ADMIN_KEY = "tenant-a-key-3f10", "tenant-b-key-8c21", "admin-key-77d4"
FIXED = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def isolated(tiny):
    with launch([str(tiny), "--dtype", "float32", "--kv-cache-bytes", "16MiB", "--api-key", KEY_A,
                 "--api-key", KEY_B, "--admin-key", ADMIN_KEY]) as running:
        yield running


def as_key(running, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=running.url, headers=headers, timeout=60)


def cached(client: httpx.Client, prompt: list[int], **extra) -> int:
    response = client.post("/v1/completions", json={"prompt": prompt, **FIXED, **extra})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def lookup(client: httpx.Client, prompt: list[int], **extra) -> dict:
    response = client.post("/v1/cache/lookup", json={"prompt": prompt, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_several_keys_get_a_namespace_each_by_default(isolated):
    prompt = list(range(5000, 5060))
    with as_key(isolated, KEY_A) as a, as_key(isolated, KEY_B) as b:
        assert [cached(a, prompt), cached(a, prompt)] == [0, 59]
        assert lookup(a, prompt)["cached_tokens"] == 59
        nothing = {"cached_tokens": 0, "prompt_tokens": 60, "diverged_at": None, "miss_reason": None,
                   "diverged_message": None}
        # B finds nothing of A's, and the miss reason says nothing about any other namespace
        assert lookup(b, prompt) == nothing
        assert lookup(b, prompt, cache_salt="probe") == nothing
        assert cached(b, prompt, cache_report=True) == 0
        report = b.post("/v1/completions", json={"prompt": prompt[:-1] + [7], **FIXED, "cache_report": True})
        assert report.json()["cache"]["miss_reason"] is None


def test_cache_check_needs_the_admin_key(isolated):
    with as_key(isolated, KEY_A) as a, as_key(isolated, None) as anonymous, as_key(isolated, ADMIN_KEY) as admin:
        assert_error(a.get("/v1/cache/check"), 403, code="admin_key_required")
        assert_error(anonymous.get("/v1/cache/check"), 401, code="invalid_api_key")
        assert_error(as_key(isolated, "wrong").get("/v1/cache/check"), 401, code="invalid_api_key")
        wait_idle(admin)
        check = admin.get("/v1/cache/check").json()
        assert check["ok"] and check["blocks"]["used"] == 0
        assert admin.get("/v1/models").status_code == 200


def test_the_admin_key_is_not_an_inference_key(isolated):
    with as_key(isolated, ADMIN_KEY) as admin:
        for path, body in (("/v1/completions", {"prompt": "Hi", **FIXED}), ("/v1/cache/lookup", {"prompt": "Hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
            assert_error(admin.post(path, json=body), 403, code="admin_key_not_allowed")


def test_the_admin_key_sees_every_namespace_and_a_key_its_own(isolated):
    with as_key(isolated, KEY_A) as a, as_key(isolated, KEY_B) as b, as_key(isolated, ADMIN_KEY) as admin:
        cached(a, list(range(6000, 6021)))
        cached(b, list(range(6100, 6131)))
        wait_idle(admin)
        label_a, label_b = namespace_label(key_salt(KEY_A)), namespace_label(key_salt(KEY_B))
        seen_by_admin = admin.get("/v1/dashboard/state").json()
        seen_by_a = a.get("/v1/dashboard/state").json()
    assert seen_by_admin["scope"] == "all" and {label_a, label_b} <= set(seen_by_admin["tree"]["namespaces"])
    assert "shared" not in seen_by_admin["tree"]["namespaces"]      # no request ever runs unsalted
    assert seen_by_a["scope"] == "own" and set(seen_by_a["tree"]["namespaces"]) == {label_a}
    assert httpx.get(f"{isolated.url}/dashboard", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_shared_cache_shares_and_warns(tiny):
    with launch([str(tiny), "--dtype", "float32", "--kv-cache-bytes", "16MiB", "--api-key", KEY_A,
                 "--api-key", KEY_B, "--shared-cache"]) as running:
        prompt = list(range(7000, 7040))
        with as_key(running, KEY_A) as a, as_key(running, KEY_B) as b:
            assert cached(a, prompt) == 0
            assert lookup(b, prompt)["cached_tokens"] == 39
            assert cached(b, prompt) == 39
            assert_error(a.get("/v1/cache/check"), 403, code="admin_key_required")   # two keys, no admin key
        log = running.log()
    assert "--shared-cache: the API keys share one prefix cache, so any key can learn whether another key " \
           "sent a prompt" in log
    assert KEY_A not in log and KEY_B not in log


@pytest.mark.parametrize(("flags", "message"), [
    (["--api-key", "a", "--api-key", "b", "--shared-cache", "--salt-per-key"], "contradict"),
    (["--api-key", "a", "--admin-key", "a"], "the admin key must differ"),
])
def test_contradicting_flags_fail_at_start(flags, message):
    result = subprocess.run([sys.executable, "-m", "reprise.cli", "serve", "--model", "/nonexistent", *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr
