"""The KV pool costs RAM as it fills: its pages are anonymous mmap pages, zero until written."""
from __future__ import annotations

import torch

from reprise.engine.runner import lazy_zeros

GIB = 2**30


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_untouched_pool_pages_are_zero_and_not_resident():
    before = resident_bytes()
    pool = lazy_zeros((2, 1024, 64, 4, 64, 64), torch.bfloat16, torch.device("cpu"))     # 4 GiB
    assert pool.nbytes == 4 * GIB
    assert pool[1, 1023].abs().sum().item() == 0 and pool[0, 0].abs().sum().item() == 0
    pool[0, 5] = 1.0                                                                       # one 4 MiB block
    assert pool[0, 5].float().mean().item() == 1.0 and pool[0, 6].abs().sum().item() == 0
    assert resident_bytes() - before < 64 * 2**20


def test_views_keep_the_mapping_alive():
    pool = lazy_zeros((4, 256), torch.float32, torch.device("cpu"))
    layer = pool[2]
    del pool
    layer += 3.0
    assert torch.equal(layer, torch.full((256,), 3.0))
