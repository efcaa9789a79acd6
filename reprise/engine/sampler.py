"""Batched sampling: penalties, logit bias, min_tokens, grammar masks, then temperature, top-k,
top-p, min-p, and greedy argmax or a draw from each request's seeded generator; logprobs from the
raw logits; the distribution math itself (filtering, draws, speculative acceptance) is in
distributions.py.

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
from reprise.engine.distributions import accept_greedy, draw, filtered_probs, token_logprobs
from reprise.engine.request import Sampled, SamplingParams, TokenLogprob

# the bits of float32 -inf as an int32 (0xFF800000): (bit - 1) * 2**23 is 0.0 or -inf, branch-free
_MINUS_INF_BITS = 2 ** 23


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
                tokens.append(draw(probs.pop(0), draft, state.generator))
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
