"""`reprise chat`: an interactive multi-turn chat in the terminal, streamed token by token."""
from __future__ import annotations

import sys

from reprise.engine.request import SamplingParams
from reprise.llm import LLM, ChatSession


def run_chat(llm_kwargs: dict, system: str | None, temperature: float, max_tokens: int) -> int:
    llm = LLM(**llm_kwargs)
    session = ChatSession(llm, system=system)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    print("reprise chat: type a message, /reset to start over, Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not text.strip():
            continue
        if text.strip() == "/reset":
            session = ChatSession(llm, system=system)
            continue
        output = None
        for output in session.stream(text, params):
            print(output.delta_text, end="", flush=True)
        print()
        print(f"[{output.cached_tokens}/{len(output.prompt_token_ids)} prompt tokens cached]", file=sys.stderr)
