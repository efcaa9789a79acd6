"""Prompts of a controlled length for `reprise bench serve`, and the local token counts it falls back on.

Prompts are made of vocabulary words that are one token each (" river", " stone", ...), so a
prompt of N words is exactly N tokens for the local tokenizer (the default model's, unless
`--tokenizer` names another), and two prompts sharing their first K words share exactly K
tokens. Words come from a `random.Random` seeded with the run's nonce, so a run is reproducible
from its JSON and a second run against the same server starts cold.
"""
from __future__ import annotations

import random

from reprise.loader import Tokenizer, load_model

_VOCAB_IDS = range(256, 12000)          # ordinary words; past the byte tokens, before the rare pieces


class Words:
    """Word-level prompts over one tokenizer, and token counts for servers that report none."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocabulary = [tokenizer.decode([i]) for i in _VOCAB_IDS if _is_word(tokenizer, i)]
        if len(self.vocabulary) < 100:
            raise ValueError("the tokenizer has too few single-token words to build prompts from")

    @classmethod
    def load(cls, path: str | None) -> Words:
        """The tokenizer of a GGUF file or Hugging Face directory (None = the default model); no weights."""
        return cls(load_model(path).tokenizer)

    @property
    def eos_ids(self) -> list[int]:
        return sorted(self.tokenizer.eos_token_ids)

    def sample(self, rng: random.Random, num_tokens: int) -> list[str]:
        """num_tokens words, each one token; join them with "" to get the text."""
        return [rng.choice(self.vocabulary) for _ in range(num_tokens)]

    def text(self, rng: random.Random, num_tokens: int) -> str:
        return "".join(self.sample(rng, num_tokens))

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def count_chat(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode(self.tokenizer.render_chat(messages)))


def _is_word(tokenizer: Tokenizer, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    return (len(text) > 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
            and text[1:].islower() and tokenizer.encode(text) == [token_id])
