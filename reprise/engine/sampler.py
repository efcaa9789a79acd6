"""Batched sampling: penalties, logit bias, min_tokens, grammar masks, then temperature, top-k,
top-p, min-p, and greedy argmax or a draw from each request's seeded generator; logprobs from the
raw logits. Also the acceptance rule of speculative decoding, which keeps each request's output
distribution.

Per step the logits are adjusted in this order, each a few batched ops over the rows that
need it; rows with no control are never touched, so a plain greedy row is the raw argmax:

| step        | rows                                 | effect on a row's logits                          |
|-------------|--------------------------------------|---------------------------------------------------|
| repetition  | repetition_penalty != 1              | prompt or output tokens: > 0 divided, else times  |
| frequency   | frequency / presence_penalty         | - frequency * count - presence * (count > 0)      |
| logit_bias  | logit_bias                           | + bias                                            |
| min_tokens  | fewer than min_tokens generated      | EOS and stop_token_ids -> -inf                    |
| grammar     | guided                               | tokens the grammar refuses (and padding) -> -inf  |
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reprise.chat.grammar import Grammars, Matcher
from reprise.engine.request import Sampled, SamplingParams, TokenLogprob

# the bits of float32 -inf as an int32 (0xFF800000): (bit - 1) * 2**23 is 0.0 or -inf, branch-free
_MINUS_INF_BITS = 2 ** 23
_TOP_P_CANDIDATES = 1024


@dataclass(eq=False)
class _RequestState:
    params: SamplingParams
    generator: torch.Generator | None            # sampling requests only
    matcher: Matcher | None                      # guided requests only
    # presence/frequency: per output token, times generated, and [vocab] float32 frequency * count +
    # presence * (count > 0), the amount its logit loses, updated in place with each new token
    counts: Counter[int] | None = None
    subtracted: torch.Tensor | None = None
    # repetition: [vocab] float32, the penalty at prompt and output tokens, 1 elsewhere
    repetition: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    num_generated: int = 0

    @property
    def stops_masked(self) -> bool:
        return self.num_generated < self.params.min_tokens and not (self.matcher and self.matcher.is_finished)


class Sampler:
    """Draws each request's next tokens from a batch of logits and keeps what each request's
    controls need between steps (penalty counts, grammar position, tokens generated).
    Used by the engine thread only."""

    def __init__(self, seed: int, vocab_size: int, eos_token_ids: frozenset[int], grammars: Grammars | None,
                 device: torch.device):
        self._seed = seed
        self._vocab_size = vocab_size
        self._eos_token_ids = frozenset(eos_token_ids)
        self._grammars = grammars
        self._device = torch.device(device)
        self._states: dict[str, _RequestState] = {}

    def add(self, request_id: str, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        """Registers a request before its first step. Raises GrammarError (a ValueError) for a
        guided spec that cannot compile, ValueError for a logit_bias token out of the vocabulary."""
        matcher = None
        if params.guided is not None:
            if self._grammars is None:
                raise ValueError("guided decoding needs a grammar engine")
            matcher = self._grammars.matcher(params.guided)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else self._seed + hash(request_id) % 2**31)
        state = _RequestState(params, generator, matcher)
        if params.presence_penalty or params.frequency_penalty:
            state.counts = Counter()
            state.subtracted = torch.zeros(self._vocab_size, device=self._device)
        if params.repetition_penalty != 1.0:
            state.repetition = torch.ones(self._vocab_size, device=self._device)
            state.repetition[torch.tensor(list(prompt_ids), dtype=torch.long, device=self._device)] = \
                params.repetition_penalty
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            if not all(0 <= token_id < self._vocab_size for token_id in ids):
                raise ValueError(f"logit_bias token ids must be in [0, {self._vocab_size})")
            state.bias_ids = torch.tensor(ids, dtype=torch.long, device=self._device)
            state.bias_values = torch.tensor(values, dtype=torch.float32, device=self._device)
        self._states[request_id] = state

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], draft_ids: list[tuple[int, ...]]) -> list[Sampled]:
        """Each request's new tokens: the draft tokens the model agrees with, then one of its own.

        logits: [rows, vocab] float32, 1 + len(draft) rows per request in order (the row at its
        last token predicts the first draft, ...; a request without drafts has one row). Greedy
        keeps drafts equal to the argmax; sampling keeps them by `accept_or_resample`. So a request
        gets 1 .. len(draft) + 1 tokens, distributed as plain decoding would draw them. A request
        with penalties, min_tokens or a grammar never has drafts.
        """
        states, starts = self._batch(request_ids, draft_ids)
        adjusted = self._adjust(logits, states, starts, draft_ids)
        argmax = adjusted.argmax(dim=-1).tolist()              # one batched op for every greedy row
        probs = self._probs(adjusted, states, starts, draft_ids)
        tokens = []
        for state, start, draft in zip(states, starts, draft_ids):
            if state.params.greedy:
                tokens.append(accept_greedy(argmax[start:start + len(draft) + 1], draft))
            else:
                tokens.append(_draw(probs.pop(0), draft, state.generator))
        logprobs = self._logprobs(logits, states, starts, tokens)
        for state, new_ids in zip(states, tokens):
            self._advance(state, new_ids)
        return [Sampled(new_ids, found) for new_ids, found in zip(tokens, logprobs)]

    def adjust(self, logits: torch.Tensor, request_ids: list[str], draft_ids: list[tuple[int, ...]]) -> torch.Tensor:
        """The logits `sample` draws from: after penalties, bias, min_tokens and grammar (rows as
        in `sample`); the same tensor when no row has any of them. Changes no state."""
        return self._adjust(logits, *self._batch(request_ids, draft_ids), draft_ids)

    def _batch(self, request_ids, draft_ids) -> tuple[list[_RequestState], list[int]]:
        """The requests' states and their first rows."""
        states, starts, row = [], [], 0
        for request_id, draft in zip(request_ids, draft_ids):
            state = self._states[request_id]
            assert not draft or not (state.params.penalized or state.params.min_tokens or state.matcher)
            states.append(state)
            starts.append(row)
            row += 1 + len(draft)
        return states, starts

    def _adjust(self, logits, states, starts, draft_ids) -> torch.Tensor:
        """The logits after penalties, bias, min_tokens and grammar (see the table above); the same
        tensor when no row has any of them."""
        penalized = [(start, s) for start, s in zip(starts, states) if s.params.penalized]
        biased = [(start, 1 + len(d), s) for start, d, s in zip(starts, draft_ids, states) if s.bias_ids is not None]
        stopped = [(start, s) for start, s in zip(starts, states) if s.stops_masked]
        guided = [(start, s) for start, s in zip(starts, states) if s.matcher is not None]
        if not (penalized or biased or stopped or guided):
            return logits
        adjusted = logits.clone()
        if penalized:
            self._penalize(adjusted, penalized)
        if biased:
            rows = torch.cat([torch.arange(start, start + n, device=self._device).repeat_interleave(len(s.bias_ids))
                              for start, n, s in biased])
            ids = torch.cat([s.bias_ids.repeat(n) for _, n, s in biased])
            values = torch.cat([s.bias_values.repeat(n) for _, n, s in biased])
            adjusted.index_put_((rows, ids), values, accumulate=True)
        pairs = [(start, token_id) for start, s in stopped
                 for token_id in self._eos_token_ids | set(s.params.stop_token_ids) if token_id < adjusted.shape[1]]
        if pairs:
            rows, ids = torch.tensor(pairs, dtype=torch.long, device=self._device).T
            adjusted.index_put_((rows, ids), torch.tensor(float("-inf"), device=self._device))
        if guided:
            self._mask_grammar(adjusted, guided)
        return adjusted

    def _penalize(self, logits: torch.Tensor, penalized: list[tuple[int, _RequestState]]) -> None:
        rows = torch.tensor([start for start, _ in penalized], device=self._device)
        values = logits[rows]
        repeated = [i for i, (_, s) in enumerate(penalized) if s.repetition is not None]
        if repeated:
            at = torch.tensor(repeated, device=self._device)
            part, penalty = values[at], torch.stack([penalized[i][1].repetition for i in repeated])
            # x > 0 gets x / p, else x * p: for p > 1 the smaller of the two, for p < 1 the larger
            # (sign = -1 flips min to max); exact, and much faster than torch.where on a CPU
            sign = torch.tensor([1.0 if penalized[i][1].params.repetition_penalty > 1 else -1.0 for i in repeated],
                                device=self._device)[:, None]
            values[at] = sign * torch.minimum(sign * part / penalty, sign * part * penalty)
        subtracting = [i for i, (_, s) in enumerate(penalized) if s.subtracted is not None]
        if subtracting:
            at = torch.tensor(subtracting, device=self._device)
            values[at] -= torch.stack([penalized[i][1].subtracted for i in subtracting])
        logits[rows] = values

    def _mask_grammar(self, logits: torch.Tensor, guided: list[tuple[int, _RequestState]]) -> None:
        """One bitmask for the batch's guided rows, filled per row, applied in one op; columns past
        the grammar's vocabulary (the model's padding) are refused too."""
        num_words = (self._grammars.vocab_size + 31) // 32
        bitmask = torch.zeros((len(guided), num_words), dtype=torch.int32)
        self._grammars.fill([s.matcher for _, s in guided], bitmask)
        bitmask = bitmask.to(self._device)
        shifts = torch.arange(32, dtype=torch.int32, device=self._device)
        bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)
        additive = bits.sub_(1).mul_(_MINUS_INF_BITS).view(torch.float32)     # allowed 0.0, refused -inf
        width = logits.shape[1]
        if additive.shape[1] < width:
            padding = torch.full((len(guided), width - additive.shape[1]), float("-inf"), device=self._device)
            additive = torch.cat([additive, padding], dim=1)
        rows = torch.tensor([start for start, _ in guided], device=self._device)
        logits.index_add_(0, rows, additive[:, :width])

    def _probs(self, logits, states, starts, draft_ids) -> list[torch.Tensor]:
        """Per sampling request (in order), its rows' filtered probabilities, on the CPU."""
        sampling = [(start, 1 + len(d), s) for start, d, s in zip(starts, draft_ids, states) if not s.params.greedy]
        if not sampling:
            return []
        rows = torch.cat([torch.arange(start, start + n) for start, n, _ in sampling]).to(self._device)
        params = [s.params for _, n, s in sampling for _ in range(n)]
        probs = filtered_probs(logits[rows], params).cpu()
        return list(probs.split([n for _, n, _ in sampling]))

    def _logprobs(self, logits, states, starts, tokens) -> list[list[TokenLogprob] | None]:
        """Per request, the raw logprob of each new token with the top `params.logprobs`, or None."""
        asking = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        results: list[list[TokenLogprob] | None] = [None] * len(states)
        if not asking:
            return results
        rows = [starts[i] + k for i in asking for k in range(len(tokens[i]))]
        found = token_logprobs(logits[torch.tensor(rows, device=logits.device)], [t for i in asking for t in tokens[i]],
                               max(states[i].params.logprobs for i in asking))
        for i in asking:
            num_top = states[i].params.logprobs
            results[i] = [dataclasses.replace(entry, top=entry.top[:num_top]) for entry in found[:len(tokens[i])]]
            found = found[len(tokens[i]):]
        return results

    @staticmethod
    def _advance(state: _RequestState, new_ids: list[int]) -> None:
        state.num_generated += len(new_ids)
        params = state.params
        for token_id in new_ids:
            if state.counts is not None:
                state.counts[token_id] += 1
                state.subtracted[token_id] = params.frequency_penalty * state.counts[token_id] + params.presence_penalty
            if state.repetition is not None:
                state.repetition[token_id] = params.repetition_penalty
            if state.matcher is not None:
                state.matcher.accept(token_id)


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


def _draw(probs: torch.Tensor, draft: tuple[int, ...], generator: torch.Generator) -> list[int]:
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
