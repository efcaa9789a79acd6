"""The HTTP side of `reprise bench serve`: streamed requests to any OpenAI-compatible server.

One request -> one record (a flat dict that goes into the JSON as is):
  ttft_s              seconds from sending to the first chunk with content
  e2e_s               seconds from sending to the end of the stream
  tpot_s              (e2e_s - ttft_s) / (completion_tokens - 1); None for one token
  prompt_tokens, completion_tokens, cached_tokens
  token_source        where the counts came from: "usage" (the final usage chunk), "timings"
                      (llama.cpp's `timings`: prompt_n + cache_n, predicted_n, cache_n) or
                      "estimated" (local tokenizer for the prompt, content chunks for the output)
  ok, status, error   a failed request is recorded, never raised
`cached_tokens` is None when the server reports nothing about its cache.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx


class Client:
    """Streams completions and chat completions; reads /v1/models and the cache counters of /metrics."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None, timeout_s: float,
                 eos_ids: list[int] | None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                      timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model = model
        self.timeout_s = timeout_s
        self.eos_ids = eos_ids              # None = let the model stop at EOS

    async def close(self) -> None:
        await self.http.aclose()

    async def models(self) -> dict | None:
        """The server's /v1/models answer, None if it has none; ValueError if nothing answers."""
        try:
            response = await self.http.get("/v1/models")
            return response.json() if response.status_code == 200 else None
        except httpx.TransportError as error:
            raise ValueError(f"cannot reach {self.http.base_url}: {error}") from error
        except (httpx.HTTPError, ValueError):
            return None

    async def cache_counters(self) -> dict | None:
        """{"queries", "hits", "source"} summed over label sets, from reprise's or vLLM's names; else None."""
        try:
            response = await self.http.get("/metrics")
        except httpx.HTTPError:
            return None
        return parse_cache_counters(response.text) if response.status_code == 200 else None

    async def complete(self, prompt: str, max_tokens: int, count_prompt: Callable[[], int]) -> tuple[dict, str]:
        return await self.stream("/v1/completions", {"prompt": prompt}, max_tokens, count_prompt)

    async def chat(self, messages: list[dict], max_tokens: int, count_prompt: Callable[[], int]) -> tuple[dict, str]:
        return await self.stream("/v1/chat/completions", {"messages": messages}, max_tokens, count_prompt)

    async def stream(self, path: str, body: dict, max_tokens: int,
                     count_prompt: Callable[[], int]) -> tuple[dict, str]:
        """(record, generated text). `count_prompt` estimates prompt tokens when the server reports none."""
        tally = Tally(time.perf_counter())
        try:
            await asyncio.wait_for(self._read(path, self._body(body, max_tokens), tally), self.timeout_s)
        except asyncio.TimeoutError:
            tally.error = f"timed out after {self.timeout_s:g} s"
        except (httpx.HTTPError, ValueError) as error:
            tally.error = f"{type(error).__name__}: {error}"
        return tally.record(time.perf_counter(), count_prompt), "".join(tally.parts)

    def _body(self, body: dict, max_tokens: int) -> dict:
        body = {**body, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.model is not None:
            body["model"] = self.model
        if self.eos_ids is not None:        # ignore_eos for reprise and vLLM, logit_bias for llama.cpp
            body["ignore_eos"] = True
            body["logit_bias"] = {str(i): -100 for i in self.eos_ids}
        return body

    async def _read(self, path: str, body: dict, tally: Tally) -> None:
        async with self.http.stream("POST", path, json=body) as response:
            tally.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                tally.error = response.text[:500]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"not a chunk object: {data[:100]}")
                tally.add(chunk, time.perf_counter())


class Tally:
    """What one stream said so far: content, first-content time, usage, llama.cpp timings, errors."""

    def __init__(self, start: float):
        self.start = start
        self.first: float | None = None
        self.parts: list[str] = []
        self.usage: dict | None = None
        self.timings: dict | None = None
        self.status: int | None = None
        self.error: str | None = None

    def add(self, chunk: dict, now: float) -> None:
        if chunk.get("error"):
            error = chunk["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)[:500]
        self.usage = chunk.get("usage") or self.usage
        self.timings = chunk.get("timings") or self.timings
        for choice in chunk.get("choices") or ():
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                self.first = self.first or now
                self.parts.append(text)

    def record(self, end: float, count_prompt: Callable[[], int]) -> dict:
        prompt, completion, cached, source = token_counts(self.usage, self.timings, len(self.parts), count_prompt)
        if self.error is None and self.first is None:
            self.error = "the stream carried no content"
        ok = self.error is None
        ttft = self.first - self.start if self.first is not None else None
        tpot = (end - self.first) / (completion - 1) if ok and completion > 1 else None
        return {"ok": ok, "status": self.status, "error": self.error,
                "ttft_s": ttft, "tpot_s": tpot, "e2e_s": end - self.start, "prompt_tokens": prompt,
                "completion_tokens": completion, "cached_tokens": cached, "token_source": source}


def token_counts(usage: dict | None, timings: dict | None, num_chunks: int,
                 count_prompt: Callable[[], int]) -> tuple[int, int, int | None, str]:
    """(prompt, completion, cached, source) from usage, else llama.cpp timings, else estimates."""
    if usage and usage.get("prompt_tokens") is not None:
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        if cached is None and timings:
            cached = timings.get("cache_n")
        return usage["prompt_tokens"], usage.get("completion_tokens", num_chunks), cached, "usage"
    if timings and timings.get("prompt_n") is not None:
        cached = timings.get("cache_n")
        return timings["prompt_n"] + (cached or 0), timings.get("predicted_n", num_chunks), cached, "timings"
    return count_prompt(), num_chunks, None, "estimated"


_COUNTERS = {"reprise": ("reprise:prefix_cache_queries_total", "reprise:prefix_cache_hits_total"),
             "vllm": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")}


def parse_cache_counters(text: str) -> dict | None:
    """Prefix-cache token counters from Prometheus text, each summed over its label sets; reprise's
    queries are its memory tier's (every prompt token; a lower tier's queries are a subset)."""
    totals: dict[str, float] = {}
    memory_queries: dict[str, float] = {}     # reprise's tiers: every prompt token is a memory query
    for line in text.splitlines():
        if line.startswith('reprise:prefix_cache_queries_total{tier="memory"}'):
            memory_queries["reprise:prefix_cache_queries_total"] = float(line.split()[-1])
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else line.partition(" ")
            value = rest.rsplit("}", 1)[-1].split()
            if value:
                totals[name] = totals.get(name, 0.0) + float(value[0])
    for source, (queries, hits) in _COUNTERS.items():
        if queries in totals and hits in totals:
            return {"queries": memory_queries.get(queries, totals[queries]), "hits": totals[hits], "source": source}
    return None
