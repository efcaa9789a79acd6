"""`reprise bench spec`: decode speed with and without prompt-lookup speculative decoding, greedy, on
answers that quote their prompt (repeat a text, edit a piece of code), one request at a time.

Both modes run on one engine started with `speculative="ngram"`; the plain runs opt out per request
(`SamplingParams(speculative=False)`), so weights, cache and batch shapes are otherwise the same.
"""
from __future__ import annotations

import statistics
import time

from tqdm import tqdm

from reprise.engine.request import SamplingParams
from reprise.llm import LLM
from reprise.chat.continuity import ReplyMemory, chat_prompt_ids

PROSE = ("The harbor was quiet in the early morning. Fishing boats rocked gently against the pier while gulls "
         "circled overhead, waiting for the first catch of the day. An old man sat on a wooden crate, mending a "
         "net with slow and careful hands, as he had done every morning for forty years.")
LIST = ("Shopping list: two loaves of bread, a dozen eggs, one bottle of olive oil, three onions, a bag of rice, "
        "fresh basil, four tomatoes, a block of cheese and a jar of honey.")
CODE = ('def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n'
        '        subtotal += item.price * item.quantity\n    tax = subtotal * tax_rate\n'
        '    return subtotal + tax\n')
CASES = {
    "repeat prose": f"Repeat the following text exactly: {PROSE}",
    "repeat list": f"Repeat the following text exactly: {LIST}",
    "rename in code": f"Rename the variable subtotal to net in this code and show the whole code:\n{CODE}",
    "comment code": f"Add a docstring to this function and show the whole code:\n{CODE}",
}


def timed_answer(llm: LLM, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], int, float]:
    """(token ids, tokens after the first, seconds after the first) of one request run alone."""
    engine = llm.engine
    request = engine.add_request(prompt_ids, params)
    first_time, num_decoded, final = None, 0, None
    while engine.has_work:
        for output in engine.step():
            if output.request_id != request.request_id:
                continue
            if first_time is None:
                first_time = time.perf_counter()
                num_decoded -= 1                       # the first token is the prefill's, not decode's
            num_decoded += len(output.delta_token_ids)
            final = output
    return final.token_ids, num_decoded, time.perf_counter() - first_time


def measure_case(llm: LLM, prompt_ids: list[int], decode_tokens: int, repeats: int) -> dict:
    """Median decode tokens/s per mode, the speedup, the acceptance rate, and whether both agree."""
    tokens_per_s, answers = {}, {}
    stats = llm.engine.stats()
    for mode in ("plain", "spec"):
        params = SamplingParams(temperature=0, max_tokens=decode_tokens, speculative=mode == "spec")
        rates = []
        for _ in range(repeats):
            answers[mode], num_decoded, seconds = timed_answer(llm, prompt_ids, params)
            rates.append(num_decoded / seconds)
        tokens_per_s[mode] = statistics.median(rates)
    after = llm.engine.stats()
    drafted = after.num_draft_tokens - stats.num_draft_tokens
    accepted = after.num_accepted_tokens - stats.num_accepted_tokens
    return {"tokens": len(answers["spec"]), "plain_tok_s": tokens_per_s["plain"], "spec_tok_s": tokens_per_s["spec"],
            "speedup": tokens_per_s["spec"] / tokens_per_s["plain"],
            "acceptance": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
            "same_tokens": answers["plain"] == answers["spec"]}


def run_spec(llm_kwargs: dict, decode_tokens: int, repeats: int) -> dict:
    llm = LLM(**{**llm_kwargs, "speculative": "ngram"})
    engine = llm.engine
    if engine.drafter is None:
        raise ValueError("this model has recurrent layers, so it always decodes plainly: nothing to compare")
    prompts = {name: chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": text}], ReplyMemory())
               for name, text in CASES.items()}
    timed_answer(llm, prompts["repeat list"], SamplingParams(temperature=0, max_tokens=8))     # warm-up
    rows = [{"case": name, **measure_case(llm, ids, decode_tokens, repeats)}
            for name, ids in tqdm(prompts.items(), desc="spec", leave=False)]
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    plain = statistics.mean(r["plain_tok_s"] for r in rows)
    spec = statistics.mean(r["spec_tok_s"] for r in rows)
    rows.append({"case": "mean", "tokens": None, "plain_tok_s": plain, "spec_tok_s": spec, "speedup": spec / plain,
                 "acceptance": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
                 "same_tokens": all(r["same_tokens"] for r in rows)})
    drafter = engine.drafter
    return {"benchmark": "spec", "dtype": str(engine.dtype).removeprefix("torch."),
            "spec_tokens": drafter.num_draft_tokens, "ngram": [drafter.ngram_max, drafter.ngram_min], "rows": rows}
