"""Sampler: greedy, temperature, top-k, top-p, with a per-request seeded generator."""
from __future__ import annotations

import torch

from reprise.engine.request import SamplingParams


class Sampler:
    def __init__(self, seed: int):
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """logits: [num_seqs, vocab] float32. Greedy rows take one batched argmax."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, (request_id, param) in enumerate(zip(request_ids, params)):
            if not param.greedy:
                tokens[row] = self._draw(logits[row], param, self._generator(request_id, param))
        return tokens

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator()
            seed = params.seed if params.seed is not None else self._seed + hash(request_id) % 2**31
            generator.manual_seed(seed)
            self._generators[request_id] = generator
        return generator

    @staticmethod
    def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        logits = logits.cpu() / params.temperature
        if params.top_k and params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set whose mass reaches top_p (the token crossing it included)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))
