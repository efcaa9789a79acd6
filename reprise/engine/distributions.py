"""What a row's logits become once adjusted: logprobs, the top-k / top-p / min-p filtered
distribution, a seeded draw from it, and speculative decoding's acceptance rule, which keeps each
request's output distribution whatever the draft. Pure functions of tensors and a generator: the
Sampler (sampler.py) holds the per-request state and calls them.

Tenants: nothing here outlives a call; each request draws from its own seeded generator.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from reprise.engine.request import SamplingParams, TokenLogprob

_TOP_P_CANDIDATES = 1024


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: int) -> list[TokenLogprob]:
    """Row i's log_softmax at token_ids[i], with the row's `num_top` most likely tokens (most
    likely first). The logits are taken as they are: pass raw ones for what the model said."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    if num_top:
        values, ids = logprobs.topk(num_top, dim=-1)
        top = [tuple(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        top = [()] * len(chosen)
    return [TokenLogprob(token_id, logprob, entries) for token_id, logprob, entries in zip(token_ids, chosen, top)]


def filtered_probs(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]) -> torch.Tensor:
    """Softmax of each row's logits / temperature over its top_k, top_p and min_p survivors,
    renormalized; [rows, vocab]. `params` is every row's, or params[i] row i's. top_k keeps ties
    with the k-th logit; top_p keeps the smallest set whose mass reaches it (the token crossing it
    included); min_p drops tokens whose probability is below min_p times the top one's."""
    if isinstance(params, SamplingParams):
        params = [params] * logits.shape[0]
    vocab = logits.shape[-1]
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        k = torch.tensor(top_k, device=device)
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
        kth = kth.masked_fill((k == 0)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        probs = _top_p(probs, torch.tensor([p.top_p for p in params], device=device)[:, None])
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes each row's tokens outside the smallest most-likely set whose mass reaches top_p.
    That set almost always lies in the top 1024, which a partial sort finds much faster than a
    full one; the full sort is the fallback."""
    num_candidates = min(probs.shape[-1], _TOP_P_CANDIDATES)
    sorted_probs, order = probs.topk(num_candidates, dim=-1)
    if num_candidates < probs.shape[-1] and bool((sorted_probs.sum(-1, keepdim=True) < top_p).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _choose(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from `probs` ([vocab], >= 0, not all 0): the inverse of its CDF at one
    uniform number; a token of probability 0 is never drawn. One cumsum, unlike multinomial's
    per-call setup, which costs ~1 ms at 49k tokens on a CPU."""
    cdf = probs.cumsum(0)
    index = int(torch.searchsorted(cdf, torch.rand((), generator=generator) * cdf[-1], right=True))
    return index if index < len(probs) else int(probs.nonzero()[-1])        # rounding at the very top


def draw(probs: torch.Tensor, draft: tuple[int, ...], generator: torch.Generator) -> list[int]:
    """Sampled tokens for a row with `draft` drafted after it (probs: [len(draft) + 1, vocab]): each
    drafted position kept or resampled by `accept_or_resample`, up to the first one resampled; if every
    draft is kept, one more token drawn after them."""
    tokens = []
    for row, draft_id in enumerate(draft):
        tokens.append(accept_or_resample(probs[row], draft_id, generator))
        if tokens[-1] != draft_id:
            return tokens
    tokens.append(_choose(probs[len(draft)], generator))
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
    return _choose(residual, generator)
