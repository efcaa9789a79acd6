"""AsyncEngine delivery: a step's outputs reach every stream as deltas that add up to the final output."""
from __future__ import annotations

import asyncio

from reprise import SamplingParams
from reprise.engine.async_engine import AsyncEngine
from tests.conftest import prompt_ids

NUM_STREAMS = 8


async def collect(async_engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list]:
    streams = [async_engine.generate(prompt, p) for prompt, p in zip(prompts, params)]

    async def drain(stream) -> list:
        return [output async for output in stream]
    return await asyncio.gather(*(drain(stream) for stream in streams))


def test_eight_concurrent_streams_deltas_add_up_to_the_final_output(llm):
    """Only the finished output carries the whole token_ids and logprobs; the deltas before it,
    concatenated, are exactly that output (ids, text and logprobs), for every stream."""
    prompts = [prompt_ids(llm, f"async-deltas-{n}", 12 + 5 * n) for n in range(NUM_STREAMS)]
    params = [SamplingParams(temperature=0, max_tokens=20 + n, ignore_eos=True, logprobs=2 if n % 2 else None)
              for n in range(NUM_STREAMS)]
    async_engine = AsyncEngine(llm.engine)
    try:
        runs = asyncio.run(collect(async_engine, prompts, params))
    finally:
        async_engine.shutdown(timeout=30)
    for n, outputs in enumerate(runs):
        *running, final = outputs
        assert final.finished and not any(output.finished for output in running)
        assert all(output.token_ids is None and output.logprobs is None for output in running)
        assert len(final.token_ids) == 20 + n
        assert sum((output.delta_token_ids for output in outputs), []) == final.token_ids
        assert "".join(output.delta_text for output in outputs) == final.text
        if n % 2:
            assert sum((output.delta_logprobs for output in outputs), []) == final.logprobs
            assert [entry.token_id for entry in final.logprobs] == final.token_ids
        else:
            assert all(output.delta_logprobs is None for output in outputs) and final.logprobs is None


def test_a_burst_after_idle_starts_in_one_step(llm):
    """Requests queued a little apart while the engine is idle all run in its first step: when
    the first stream gets its first token, every other stream has its own already (they come in
    one delivery), and each stream's tokens are those it gets alone."""
    prompts = [prompt_ids(llm, f"async-burst-{n}", 16) for n in range(4)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    alone = [llm.generate([prompt], params)[0].token_ids for prompt in prompts]
    async_engine = AsyncEngine(llm.engine, admission_quiet_s=0.2)

    async def burst() -> tuple[list[bool], list[list[int]]]:
        streams = []
        for prompt in prompts:
            streams.append(async_engine.generate(prompt, params))
            await asyncio.sleep(0.01)       # well inside the quiet period
        first = await anext(streams[0])
        ready = [not stream.outputs.empty() for stream in streams[1:]]
        rest = [[output async for output in stream] for stream in streams]
        return ready, [(first.delta_token_ids if n == 0 else []) + sum((o.delta_token_ids for o in outputs), [])
                       for n, outputs in enumerate(rest)]
    try:
        ready, token_ids = asyncio.run(burst())
    finally:
        async_engine.shutdown(timeout=30)
    assert ready == [True, True, True]
    assert token_ids == alone
