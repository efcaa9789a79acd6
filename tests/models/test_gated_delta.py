"""The gated delta rule: the chunked (prefill) and step (decode) forms agree, and a chunked run resumed
from a saved state at a multiple of RECURRENT_CHUNK computes exactly what the unsplit run computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reprise.models.layers.gated_delta import RECURRENT_CHUNK, chunked_gated_delta, step_gated_delta

HEADS, KEY_DIM, VALUE_DIM = 3, 8, 6


def random_inputs(num_tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator)
    q = F.normalize(normal(num_tokens, HEADS, KEY_DIM), dim=-1) * KEY_DIM ** -0.5
    k = F.normalize(normal(num_tokens, HEADS, KEY_DIM), dim=-1)
    v = normal(num_tokens, HEADS, VALUE_DIM)
    g = -F.softplus(normal(num_tokens, HEADS))            # log decay, <= 0
    beta = torch.sigmoid(normal(num_tokens, HEADS))
    return q, k, v, g, beta


def stepwise(q, k, v, g, beta, state):
    outs = []
    for t in range(q.shape[0]):
        out, state = step_gated_delta(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], state)
        outs.append(out)
    return torch.cat(outs), state[0]


@pytest.mark.parametrize("num_tokens", [1, 7, RECURRENT_CHUNK, RECURRENT_CHUNK + 1, 150])
@pytest.mark.parametrize("warm", [False, True])
def test_chunked_form_equals_step_form(num_tokens, warm):
    inputs = random_inputs(num_tokens)
    state = torch.randn(HEADS, KEY_DIM, VALUE_DIM) if warm else torch.zeros(HEADS, KEY_DIM, VALUE_DIM)
    chunked_out, chunked_state = chunked_gated_delta(*inputs, state)
    step_out, step_state = stepwise(*inputs, state[None])
    assert chunked_out.shape == (num_tokens, HEADS, VALUE_DIM)
    assert (chunked_out - step_out).abs().max().item() < 1e-5
    assert (chunked_state - step_state).abs().max().item() < 1e-5


def test_resuming_at_a_chunk_multiple_is_exact():
    inputs = random_inputs(150, seed=1)
    zero = torch.zeros(HEADS, KEY_DIM, VALUE_DIM)
    whole_out, whole_state = chunked_gated_delta(*inputs, zero)
    cut = 2 * RECURRENT_CHUNK
    first_out, saved = chunked_gated_delta(*(x[:cut] for x in inputs), zero)
    second_out, final = chunked_gated_delta(*(x[cut:] for x in inputs), saved.clone())
    assert torch.equal(torch.cat([first_out, second_out]), whole_out)
    assert torch.equal(final, whole_state)
