"""The K-quants with 16-input groups (Q2_K, Q3_K, Q6_K) as int4 kernel operands; see formats.py's table.

Each 16-weight group g with w = s_g (u - offset) + r_g takes one kernel group of 32 positions: its 16
inputs in the first copy and, in the second, the same inputs times coefs[1]:

| type | u (bits)            | s                | r              | first copy | second copy | scale | zero      |
|------|---------------------|------------------|----------------|------------|-------------|-------|-----------|
| Q6_K | ql + 16 qh (6)      | d * sc (int8)    | 0, offset 32   | u & 15     | 2 (u>>4) + 5 (x 8) | s | 0      |
| Q3_K | q + 4 (3)           | d * (sc - 32)    | 0, offset 4    | u + 4      | 8 (x 0)     | s     | 0         |
| Q2_K | q (2)               | d * (sc & 15)    | -dmin (sc >> 4) | u + 8     | 8 (x 0)     | s     | r         |

The 2- and 3-bit levels sit where the kernel's own offset of 8 cancels the file's, so the zero is 0 or
the file's min alone, and rounding it to bfloat16 adds nothing to rounding the file's numbers.

Bytes held: 2 positions of 4 bits per weight plus a bfloat16 scale and zero per 16 weights, 10 bits
a weight (the files hold 6.5625, 3.4375 and 2.625).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from reprise.models.layers.quant.formats import GGMLTensor, Packing, blocks_of, dequantize_with, half, unit_levels

SUB = 16                    # inputs per file group
_ONE, _ZERO = np.float16(1).tobytes(), np.float16(0).tobytes()
_COEFS = {Q.Q6_K: (1.0, 8.0), Q.Q3_K: (1.0, 0.0), Q.Q2_K: (1.0, 0.0)}


def pack_sixteen(weight: GGMLTensor) -> Packing:
    """Kernel operands for a Q2_K, Q3_K or Q6_K weight (int32 levels, float32 scales and zeros)."""
    rows, cols = weight.shape
    blocks = blocks_of(weight)
    levels, scales, residuals = _AFFINE[weight.qtype](blocks)
    levels = torch.from_numpy(levels.reshape(rows, cols // SUB, 1, SUB))
    scales = torch.from_numpy(scales.reshape(rows, cols // SUB))
    residuals = torch.from_numpy(residuals.reshape(rows, cols // SUB))
    if weight.qtype is Q.Q6_K:
        copies, zeros = torch.cat([levels & 15, 2 * (levels >> 4) + 5], dim=2), torch.zeros_like(scales)
    else:
        shift = 4 if weight.qtype is Q.Q3_K else 8
        copies, zeros = torch.cat([levels + shift, torch.full_like(levels, 8)], dim=2), residuals
    return Packing(copies.reshape(rows, 2 * cols), scales, zeros, SUB, _COEFS[weight.qtype])


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, s, r): levels int32 [blocks, 256] in [0, 64); s and r float32 [blocks, 16]."""
    levels = unit_levels(blocks, Q.Q6_K, {192: bytes([1] * 16) + _ONE}) + 32
    scales = half(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return levels, scales, np.zeros_like(scales)


def _q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, s, r) as for Q6_K, u in [0, 8). The 6-bit scales are read by dequantizing with every level 1
    (2-bit part 1, high bit set); the levels with every scale 1 (6-bit 33, see gguf.quants.Q3_K)."""
    levels = unit_levels(blocks, Q.Q3_K, {96: bytes([0x11] * 8 + [0xAA] * 4) + _ONE}) + 4
    scales = dequantize_with(blocks, Q.Q3_K, {0: bytes([0xFF] * 32 + [0x55] * 64)})[:, ::SUB]
    return levels, np.ascontiguousarray(scales), np.zeros_like(scales)


def _q2_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, s, r) as for Q6_K, u in [0, 4); each group's byte holds its scale (low 4 bits) and min."""
    levels = unit_levels(blocks, Q.Q2_K, {0: bytes([1] * 16), 80: _ONE + _ZERO})
    sub = blocks[:, :16]
    scales = half(blocks, 80) * (sub & 15).astype(np.float32)
    return levels, scales, -half(blocks, 82) * (sub >> 4).astype(np.float32)


_AFFINE = {Q.Q6_K: _q6_k, Q.Q3_K: _q3_k, Q.Q2_K: _q2_k}
