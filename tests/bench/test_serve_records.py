"""The parts of `reprise bench serve` that need no server: stream parsing, token-count fallbacks,
/metrics counters, percentiles and hit rates, on synthetic chunks and records."""
from __future__ import annotations

import pytest

from reprise.bench.client import Tally, parse_cache_counters, token_counts
from reprise.bench.serve import scenario_list, warnings
from reprise.bench.stats import counters_hit_rate, hit_rate, percentile, summarize

USAGE = {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 99}}


def record(**fields) -> dict:
    base = {"ok": True, "status": 200, "error": None, "ttft_s": 0.1, "tpot_s": 0.01, "e2e_s": 0.2,
            "prompt_tokens": 100, "completion_tokens": 4, "cached_tokens": 0, "token_source": "usage"}
    return {**base, **fields}


def stream(chunks: list[dict]) -> dict:
    """The record of a stream whose chunks arrive one second apart, starting at t=1."""
    tally = Tally(start=0.0)
    for second, chunk in enumerate(chunks, start=1):
        tally.add(chunk, float(second))
    tally.status = 200
    return tally.record(end=float(len(chunks) + 1), count_prompt=lambda: 42)


def test_completion_stream_times_the_first_content_and_takes_usage_from_the_last_chunk():
    chunks = [{"choices": [{"text": " a"}]}, {"choices": [{"text": " b"}]}, {"choices": [{"text": " c"}]},
              {"choices": [], "usage": USAGE}]
    result = stream(chunks)
    assert (result["ttft_s"], result["e2e_s"], result["tpot_s"]) == (1.0, 5.0, 2.0)     # (5 - 1) / (3 - 1)
    assert (result["prompt_tokens"], result["completion_tokens"], result["cached_tokens"]) == (100, 3, 99)
    assert result["ok"] and result["token_source"] == "usage"


def test_chat_role_chunk_is_not_the_first_token():
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"delta": {"content": "hi"}}]}, {"choices": [], "usage": USAGE}]
    assert stream(chunks)["ttft_s"] == 2.0


def test_a_stream_without_usage_is_estimated_locally():
    chunks = [{"choices": [{"delta": {"content": "x"}}]} for _ in range(5)]
    result = stream(chunks)
    assert (result["prompt_tokens"], result["completion_tokens"], result["cached_tokens"]) == (42, 5, None)
    assert result["token_source"] == "estimated"


def test_llama_cpp_timings_give_counts_and_cached_tokens():
    timings = {"prompt_n": 12, "cache_n": 88, "predicted_n": 4}
    assert token_counts(None, timings, 3, lambda: 0) == (100, 4, 88, "timings")
    assert token_counts({"prompt_tokens": 100, "completion_tokens": 4}, timings, 3, lambda: 0) == (100, 4, 88, "usage")
    assert token_counts({"prompt_tokens": 100, "completion_tokens": 4}, None, 3, lambda: 0) == (100, 4, None, "usage")


def test_an_error_event_or_an_empty_stream_fails_the_request():
    failed = stream([{"choices": [{"text": "a"}]}, {"error": {"message": "engine died", "code": 503}}])
    assert not failed["ok"] and failed["error"] == "engine died"
    empty = stream([{"choices": [], "usage": USAGE}])
    assert not empty["ok"] and empty["ttft_s"] is None and "no content" in empty["error"]


def test_cache_counters_are_read_by_reprise_and_vllm_names_summed_over_labels():
    reprise = "# HELP x\nreprise:prefix_cache_queries_total 300.0\nreprise:prefix_cache_hits_total 120.0\n"
    assert parse_cache_counters(reprise) == {"queries": 300.0, "hits": 120.0, "source": "reprise"}
    tiered = ('reprise:prefix_cache_queries_total{tier="memory"} 300.0\n'
              'reprise:prefix_cache_queries_total{tier="disk"} 200.0\n'
              'reprise:prefix_cache_hits_total{tier="memory"} 120.0\n'
              'reprise:prefix_cache_hits_total{tier="disk"} 80.0\n')
    assert parse_cache_counters(tiered) == {"queries": 300.0, "hits": 200.0, "source": "reprise"}
    vllm = ('vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0\n'
            'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0\n'
            'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9\n')
    assert parse_cache_counters(vllm) == {"queries": 1500.0, "hits": 250.0, "source": "vllm"}
    assert parse_cache_counters("process_cpu_seconds_total 3.0\n") is None


def test_counters_hit_rate_is_the_delta_ratio():
    before = {"queries": 100.0, "hits": 10.0, "source": "reprise"}
    assert counters_hit_rate(before, {"queries": 300.0, "hits": 160.0, "source": "reprise"}) == 0.75
    assert counters_hit_rate(before, before) is None and counters_hit_rate(None, before) is None


def test_percentiles_interpolate_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert [percentile(values, q) for q in (0, 50, 90, 99, 100)] == pytest.approx([1.0, 3.0, 4.6, 4.96, 5.0])
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_hit_rate_is_token_weighted_over_successful_requests():
    records = [record(prompt_tokens=100, cached_tokens=99), record(prompt_tokens=300, cached_tokens=0),
               record(ok=False, prompt_tokens=1000, cached_tokens=None, error="boom")]
    assert hit_rate(records) == 99 / 400
    summary = summarize(records, wall_s=2.0)
    assert (summary["requests"], summary["failed"]) == (3, 1)
    assert (summary["prompt_tokens"], summary["cached_tokens"]) == (400, 99)
    assert (summary["output_tokens_per_s"], summary["requests_per_s"]) == (4.0, 1.0)


def test_a_server_without_cached_tokens_gets_no_hit_rate_and_a_warning():
    records = [record(cached_tokens=None, token_source="estimated"), record(ok=False, error="HTTP 500")]
    assert hit_rate(records) is None and summarize(records, 1.0)["estimated"]
    notes = warnings(records)
    assert notes[0] == "1 failed, first: HTTP 500" and notes[1].startswith("the server reports no cached_tokens")
    assert notes[2] == "no usage in the stream: token counts estimated locally" and len(notes) == 3


def test_scenario_flag():
    assert scenario_list("all") == ["repeat", "nearest", "prefix-repetition", "multiturn", "long", "decode"]
    assert scenario_list("decode, repeat") == ["decode", "repeat"]
    with pytest.raises(Exception, match="unknown scenario 'warm'"):
        scenario_list("warm")
