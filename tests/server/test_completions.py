"""/v1/completions against a real server: cached_tokens, streaming usage, prompt forms, salts, cache reports."""
from __future__ import annotations

import json

FIXED = {"temperature": 0, "ignore_eos": True}


def sse_events(response) -> list:
    """Parsed `data:` payloads of an SSE response, "[DONE]" kept as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_repeated_long_prompt_reuses_all_but_its_last_token(client, http, fresh_prompt):
    prompt = fresh_prompt(1000)
    cold = client.completions.create(model="default", prompt=prompt, max_tokens=4, extra_body=FIXED)
    hot = client.completions.create(model="default", prompt=prompt, max_tokens=4, extra_body=FIXED)
    assert cold.usage.prompt_tokens == hot.usage.prompt_tokens == 1000
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert hot.usage.prompt_tokens_details.cached_tokens == 999
    assert hot.usage.completion_tokens == 4 and hot.usage.total_tokens == 1004
    assert hot.choices[0].text == cold.choices[0].text

    with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": True,
                                                      "stream_options": {"include_usage": True}, **FIXED}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    with_usage = [i for i, chunk in enumerate(chunks) if chunk.get("usage") is not None]
    assert with_usage == [len(chunks) - 1]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1000, "completion_tokens": 4, "total_tokens": 1004,
                                   "prompt_tokens_details": {"cached_tokens": 999}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == cold.choices[0].text


def test_openai_client_stream_sees_usage_once(client, fresh_prompt):
    prompt = fresh_prompt(40)
    client.completions.create(prompt=prompt, model="default", max_tokens=3, extra_body=FIXED)
    stream = client.completions.create(model="default", prompt=prompt, max_tokens=3, stream=True,
                                       stream_options={"include_usage": True}, extra_body=FIXED)
    chunks = list(stream)
    usages = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usages) == 1 and chunks[-1].usage is usages[0]
    assert usages[0].prompt_tokens_details.cached_tokens == 39


def test_stream_without_include_usage_has_no_usage(http, fresh_prompt):
    with http.stream("POST", "/v1/completions", json={"prompt": fresh_prompt(8), "max_tokens": 3, "stream": True,
                                                      **FIXED}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in chunk for chunk in events[:-1])
    reasons = [c["choices"][0]["finish_reason"] for c in events[:-1]]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_several_prompts_run_together_one_choice_each_in_order(client, default_model, fresh_prompt):
    texts = [fresh_prompt(12), fresh_prompt(20)]
    ids = default_model.tokenizer.encode(fresh_prompt(7))
    singles = [client.completions.create(model="default", prompt=p, max_tokens=5, extra_body=FIXED).choices[0].text
               for p in texts]
    batch = client.completions.create(model="default", prompt=texts, max_tokens=5, extra_body=FIXED)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == singles
    assert batch.usage.prompt_tokens == 32 and batch.usage.completion_tokens == 10
    assert batch.usage.prompt_tokens_details.cached_tokens == 11 + 19

    by_ids = client.completions.create(model="default", prompt=ids, max_tokens=2, extra_body=FIXED)
    assert by_ids.usage.prompt_tokens == 7 and by_ids.usage.prompt_tokens_details.cached_tokens == 0
    both = client.completions.create(model="default", prompt=[ids, ids[:5]], max_tokens=2, extra_body=FIXED)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.usage.prompt_tokens == 12 and both.usage.prompt_tokens_details.cached_tokens == 6 + 4


def test_cache_salts_never_share(client, fresh_prompt):
    prompt = fresh_prompt(64)

    def cached(salt):
        body = dict(FIXED, cache_salt=salt) if salt is not None else FIXED
        response = client.completions.create(model="default", prompt=prompt, max_tokens=2, extra_body=body)
        return response.usage.prompt_tokens_details.cached_tokens

    assert [cached("tenant-a"), cached("tenant-b"), cached(None)] == [0, 0, 0]
    assert [cached("tenant-a"), cached("tenant-b"), cached(None)] == [63, 63, 63]


def test_cache_report_and_dry_run_lookup(http, fresh_prompt):
    prompt = fresh_prompt(50)
    lookup = http.post("/v1/cache/lookup", json={"model": "default", "prompt": prompt}).json()
    assert (lookup["cached_tokens"], lookup["prompt_tokens"]) == (0, 50)
    body = {"prompt": prompt, "max_tokens": 3, "cache_report": True, **FIXED}
    first = http.post("/v1/completions", json=body).json()
    assert first["cache"] == lookup          # the dry run predicted exactly what the request got
    assert http.post("/v1/cache/lookup", json={"prompt": prompt}).json()["cached_tokens"] == 49

    diverging = prompt + " and then something else entirely"
    lookup = http.post("/v1/cache/lookup", json={"prompt": diverging}).json()
    # the cache holds the prompt and the 2 generated tokens with KV: the query leaves it at 50 or 51
    assert lookup["cached_tokens"] >= 50 and lookup["miss_reason"] == "diverged"
    assert lookup["diverged_at"] == lookup["cached_tokens"]
    assert http.post("/v1/cache/lookup", json={"prompt": prompt, "cache_salt": "other"}).json() == {
        "cached_tokens": 0, "prompt_tokens": 50, "diverged_at": None, "miss_reason": "salt", "diverged_message": None}

    with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        events = sse_events(r)
    assert events[-2]["cache"] == {"cached_tokens": 49, "prompt_tokens": 50, "diverged_at": None,
                                   "miss_reason": None, "diverged_message": None}
    assert all("cache" not in chunk for chunk in events[:-2])
    with http.stream("POST", "/v1/completions", json=dict(body, stream=True, stream_options={"include_usage": True})) as r:
        events = sse_events(r)
    assert events[-2]["choices"] == [] and events[-2]["cache"]["cached_tokens"] == 49
    assert all("cache" not in chunk for chunk in events[:-2])
