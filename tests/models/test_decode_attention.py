"""`reprise::decode_attention` (reprise/models/layers/decode_attention.cpp), the compiled decode graph's
attention, against attention computed in float64 from the same keys: scattered blocks, padded block
tables, a sliding window, grouped query heads, the second layer of a two-layer pool (the other left
as it was); and a row's bits do not depend on its batch."""
from __future__ import annotations

import pytest
import torch

from reprise.models.layers.compiled import load_decode_attention

KV_HEADS, HEADS, BLOCKS, BLOCK_SIZE, SCALE, LAYER = 3, 9, 40, 16, 0.125, 1
POSITIONS = [0, 5, 70, 33, 150]                 # keys 1, 6, 71, 34, 151: within, across and on block edges


@pytest.fixture(scope="module", autouse=True)
def kernel():
    load_decode_attention()


def reference(q, k_cache, v_cache, tables, window):
    """[rows, heads * dim] float64 attention of each row over keys first..p, read slot by slot."""
    dim, group = q.shape[-1], HEADS // KV_HEADS
    rows = []
    for row, (p, table) in enumerate(zip(POSITIONS, tables)):
        first = 0 if window is None else max(0, p - window + 1)
        slots = torch.tensor([table[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE for t in range(first, p + 1)])
        heads = []
        for head in range(HEADS):
            keys = k_cache[head // group].reshape(-1, dim)[slots].double()
            values = v_cache[head // group].reshape(-1, dim)[slots].double()
            heads.append(torch.softmax(keys @ q[row, head].double() * SCALE, 0) @ values)
        rows.append(torch.cat(heads))
    return torch.stack(rows)


def operands(dtype, dim, seed=0):
    """q, k, v, a [2 layers, 2, kv_heads, blocks, block_size, dim] pool, the block tables and them padded."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)
    blocks = torch.randperm(BLOCKS, generator=generator).tolist()            # scattered, never shared
    tables = [[blocks.pop() for _ in range(p // BLOCK_SIZE + 1)] for p in POSITIONS]
    width = max(map(len, tables))
    padded = torch.tensor([table + [0] * (width - len(table)) for table in tables])
    rows = len(POSITIONS)
    return (randn(rows, HEADS, dim), randn(rows, KV_HEADS, dim), randn(rows, KV_HEADS, dim),
            randn(2, 2, KV_HEADS, BLOCKS, BLOCK_SIZE, dim), tables, padded)


def attend(q, k, v, pool, positions, tables, window=None):
    return torch.ops.reprise.decode_attention(q, k, v, pool, LAYER, positions, tables, SCALE, window)


@pytest.mark.parametrize("dtype, dim, tolerance", [(torch.float32, 64, 1e-6), (torch.float32, 128, 1e-6),
                                                   (torch.float32, 40, 1e-6), (torch.bfloat16, 64, 2 ** -7)])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_attention_is_attention_over_the_rows_keys(dtype, dim, tolerance, window):
    q, k, v, pool, tables, padded = operands(dtype, dim)
    before = pool.clone()
    out = attend(q, k, v, pool, torch.tensor(POSITIONS), padded, window)
    k_cache, v_cache = pool[LAYER]
    for row, (p, table) in enumerate(zip(POSITIONS, tables)):       # each row's new K/V went to its slot
        block, offset = table[p // BLOCK_SIZE], p % BLOCK_SIZE
        assert torch.equal(k_cache[:, block, offset], k[row]) and torch.equal(v_cache[:, block, offset], v[row])
        k_cache[:, block, offset], v_cache[:, block, offset] = before[LAYER, :, :, block, offset]
    assert torch.equal(pool, before)                                 # and nothing else was written
    k_cache[:, [t[p // BLOCK_SIZE] for t, p in zip(tables, POSITIONS)], [p % BLOCK_SIZE for p in POSITIONS]] = \
        k.transpose(0, 1)
    v_cache[:, [t[p // BLOCK_SIZE] for t, p in zip(tables, POSITIONS)], [p % BLOCK_SIZE for p in POSITIONS]] = \
        v.transpose(0, 1)
    expected = reference(q, k_cache, v_cache, tables, window)
    assert out.shape == (len(POSITIONS), HEADS * dim) and out.dtype == dtype
    assert (out.double() - expected).abs().max() <= tolerance * expected.abs().max()


def test_a_rows_bits_do_not_depend_on_its_batch():
    q, k, v, pool, tables, padded = operands(torch.bfloat16, 64, seed=1)
    positions = torch.tensor(POSITIONS)
    batched = attend(q, k, v, pool.clone(), positions, padded)
    for row, table in enumerate(tables):
        one = slice(row, row + 1)
        alone = attend(q[one], k[one], v[one], pool.clone(), positions[one], torch.tensor([table]))
        assert torch.equal(alone, batched[one])
