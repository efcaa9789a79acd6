"""Prefill and decode throughput of the engine itself (no HTTP), the figures of the engine issue;
with `--sampling`, decode under sampling controls too (penalties, a JSON schema's token masks)."""
from __future__ import annotations

import json
import random
import time

from tqdm import tqdm

from reprise.chat.spec import GuidedSpec, ToolTag
from reprise.engine.request import SamplingParams
from reprise.llm import LLM

# a schema no 128-token output can complete, so every decoded token is masked by it
_PEOPLE = {"type": "array", "minItems": 500, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}}
_TOOL = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
_TOOL_TAGS = tuple(ToolTag("<tool_call>", '<tool_call>{"name": "%s", "arguments": ' % name, json.dumps(_TOOL),
                           "}</tool_call>") for name in ("get_weather", "get_time"))
SAMPLING = {
    "plain": {},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
                  "logit_bias": {42: -5.0}},
    "json": {"guided": GuidedSpec(json_schema=json.dumps(_PEOPLE))},
    # tool_choice auto: free text, masked by a grammar that waits for the call trigger
    "tools_auto": {"guided": GuidedSpec(tool_calls=_TOOL_TAGS)},
}


def random_prompt(llm: LLM, num_tokens: int, rng: random.Random) -> list[int]:
    """Token ids of ordinary text, never seen before (so nothing is cached)."""
    words = ["cache", "prefix", "token", "block", "model", "river", "stone", "light", "number", "garden",
             "window", "paper", "music", "signal", "harbor", "engine", "forest", "winter", "yellow", "silver"]
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids.extend(llm.tokenizer.encode(" ".join(rng.choice(words) for _ in range(64)) + f" {rng.random()}."))
    return ids[:num_tokens]


def measure_prefill(llm: LLM, num_tokens: int, rng: random.Random) -> float:
    prompt = random_prompt(llm, num_tokens, rng)
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    return num_tokens / (time.perf_counter() - start)


def measure_decode(llm: LLM, batch_size: int, num_tokens: int, rng: random.Random, sampling: str = "plain",
                   context: int = 32) -> float:
    """Aggregate tokens/s once every stream has its first token, until all finish. Each stream's
    prompt is `context` tokens: a prefix shared by the streams (computed once, then a cache hit)
    and 32 tokens of its own, so a long context costs one prefill, not one per stream."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True, **SAMPLING[sampling])
    shared = random_prompt(llm, max(context - 32, 0), rng)
    for _ in range(batch_size):
        engine.add_request(shared + random_prompt(llm, min(context, 32), rng), params)
    started: set[str] = set()
    decode_start, generated = None, 0
    while engine.has_work:
        for output in engine.step():
            if output.request_id not in started:
                started.add(output.request_id)
                if len(started) == batch_size:
                    decode_start = time.perf_counter()
            elif decode_start is not None:
                generated += len(output.delta_token_ids)
    return generated / (time.perf_counter() - decode_start)


def run_decode(llm_kwargs: dict, prompt_tokens: int, batch_sizes: list[int], decode_tokens: int,
               samplings: list[str] = ("plain",), contexts: list[int] = (32,)) -> dict:
    """Prefill, then decode per context length, batch size and sampling mode; a mode other than
    plain also reports its speed as a fraction of plain decoding at the same batch size."""
    llm = LLM(**llm_kwargs)
    rng = random.Random(0)
    measure_prefill(llm, 256, rng)                        # warm-up
    rows = [{"case": f"prefill {prompt_tokens} tokens", "tokens_per_s": measure_prefill(llm, prompt_tokens, rng)}]
    for context, batch_size in tqdm([(c, b) for c in contexts for b in batch_sizes], desc="decode", leave=False):
        plain = None
        for sampling in samplings:
            speed = measure_decode(llm, batch_size, decode_tokens, rng, sampling, context)
            plain = speed if sampling == "plain" else plain
            row = {"case": f"decode batch {batch_size}" + ("" if context == 32 else f", context {context}")
                   + ("" if sampling == "plain" else f", {sampling}"),
                   "tokens_per_s": speed, "tpot_ms": round(1000 * batch_size / speed, 2)}
            if sampling != "plain" and plain is not None:
                row["vs_plain"] = round(speed / plain, 3)
            rows.append(row)
    return {"benchmark": "decode", "dtype": str(llm.engine.dtype).removeprefix("torch."), "rows": rows}
