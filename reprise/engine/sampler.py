"""Sampler: greedy, temperature, top-k, top-p, with a per-request seeded generator; and the
acceptance rule of speculative decoding, which keeps each request's output distribution."""
from __future__ import annotations

import torch

from reprise.engine.request import SamplingParams


class Sampler:
    def __init__(self, seed: int):
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
               draft_ids: list[tuple[int, ...]]) -> list[list[int]]:
        """Each request's new tokens: the draft tokens the model agrees with, then one of its own.

        logits: [rows, vocab] float32, 1 + len(draft) rows per request in order (the row at its
        last token predicts the first draft, ...; a request without drafts has one row). Greedy
        keeps drafts equal to the argmax; sampling keeps them by `accept_or_resample`. So a request
        gets 1 .. len(draft) + 1 tokens, distributed as plain decoding would draw them.
        """
        argmax = logits.argmax(dim=-1).tolist()          # one batched op for every greedy row
        tokens, row = [], 0
        for request_id, param, draft in zip(request_ids, params, draft_ids):
            rows = slice(row, row + len(draft) + 1)
            row = rows.stop
            if param.greedy:
                tokens.append(accept_greedy(argmax[rows], draft))
            else:
                tokens.append(self._draw(logits[rows], param, draft, self._generator(request_id, param)))
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
    def _draw(logits: torch.Tensor, params: SamplingParams, draft: tuple[int, ...],
              generator: torch.Generator) -> list[int]:
        probs = filtered_probs(logits.cpu(), params)
        tokens = []
        for row, draft_id in enumerate(draft):
            tokens.append(accept_or_resample(probs[row], draft_id, generator))
            if tokens[-1] != draft_id:
                return tokens
        tokens.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
        return tokens


def accept_greedy(argmax: list[int], draft: tuple[int, ...]) -> list[int]:
    """The model's own tokens up to and including the first one that differs from the draft."""
    for position, draft_id in enumerate(draft):
        if argmax[position] != draft_id:
            return argmax[:position + 1]
    return argmax[:len(draft) + 1]


def accept_or_resample(probs: torch.Tensor, draft_id: int, generator: torch.Generator) -> int:
    """The token at a drafted position, distributed exactly as `probs` ([vocab], sums to 1).

    Speculative sampling's rule for a draft that is a point mass (prompt lookup proposes one token,
    surely): keep the draft with probability probs[draft_id], else draw from the residual
    max(probs - onehot(draft_id), 0), renormalized. P(draft) = p(d); P(x != d) = (1 - p(d)) *
    p(x) / (1 - p(d)) = p(x).
    """
    if float(torch.rand((), generator=generator)) < float(probs[draft_id]):
        return draft_id
    residual = probs.clone()
    residual[draft_id] = 0.0
    return int(torch.multinomial(residual, 1, generator=generator))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of logits / temperature over the top_k and top_p survivors; [rows, vocab]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the token crossing it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs
