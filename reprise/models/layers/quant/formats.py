"""GGML block formats as the int4 groupwise kernel's operands: integer levels, scales and zeros.

`_weight_int4pack_mm_for_cpu` computes y_n = sum_p x'_p ((q_np - 8) S_ng + Z_ng), q in [0, 16), one
(S, Z) per group g of 32 kernel positions p. A weight of `cols` inputs becomes `copies * cols`
positions: the input is cut into chunks of `chunk` inputs and each chunk is laid out `copies` times,
copy c fed the chunk times `coefs[c]` (`expand`). The kernel positions need not match the
inputs one to one, so formats wider than 4 bits or with 16-input groups still multiply exactly:

| types                   | chunk | coefs  | per kernel group (32 positions)            |
|-------------------------|-------|--------|--------------------------------------------|
| Q4_0, Q4_1, Q4_K        | cols  | (1,)   | 32 weights of one file group               |
| Q5_0, Q5_1, Q5_K, Q8_0  | cols  | (1, 1) | the high or the low 4 bits of 32 weights   |
| Q6_K                    | 16    | (1, 8) | low 4 bits, then high 2 bits, of 16 weights |
| Q2_K, Q3_K              | 16    | (1, 0) | 16 weights, then 16 unused positions       |

Q6_K: with u = 16 h + l and w = s (u - 32), the low copy holds l, the high copy holds 2 h + 5 and sees
8 x: x (l - 8) s + 8 x (2 h - 3) s = x s (u - 32). Q2_K and Q3_K have 16-input groups and at most 3
bits, so each 16-weight group takes a kernel group of its own, its unused half fed zeros.

Every repacking is exact in real arithmetic (`test_quant` rebuilds gguf's dequantized weight bit for
bit); the kernel takes scales and zeros in bfloat16, rounding them to 8 significant bits, as
dequantizing to bfloat16 rounds every weight. Zeros are a power of two times the scale, or the file's
own offset, so that rounding them adds nothing beyond rounding the scale where the file has no offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

GROUP = 32                  # kernel positions per scale/zero group
_ONE, _ZERO = np.float16(1).tobytes(), np.float16(0).tobytes()
# sub-block scales all 1, mins all 0 (see gguf.quants.Q4_K.get_scale_min for the bit layout)
_K_UNIT_SCALES = bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
# type -> (bits, what gguf's dequantize subtracts from the level, a header that makes it yield u - offset)
_FORMATS = {
    Q.Q4_0: (4, 8, _ONE), Q.Q5_0: (5, 16, _ONE), Q.Q8_0: (8, 128, _ONE),
    Q.Q4_1: (4, 0, _ONE + _ZERO), Q.Q5_1: (5, 0, _ONE + _ZERO),
    Q.Q4_K: (4, 0, _ONE + _ZERO + _K_UNIT_SCALES), Q.Q5_K: (5, 0, _ONE + _ZERO + _K_UNIT_SCALES),
}
THIRTY_TWO_TYPES = frozenset(_FORMATS)
SIXTEEN_TYPES = frozenset({Q.Q2_K, Q.Q3_K, Q.Q6_K})      # packed by sixteen.py
NATIVE_TYPES = THIRTY_TWO_TYPES | SIXTEEN_TYPES


@dataclass(frozen=True)
class GGMLTensor:
    """A 2-D weight as a GGUF file stores it: `blocks` is uint8 [rows, row_bytes] of `qtype` blocks,
    `shape` is (rows, columns) of the weight it encodes."""

    blocks: np.ndarray
    qtype: Q
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, as gguf's reference dequantizer computes it."""
        return torch.from_numpy(gguf.quants.dequantize(self.blocks, self.qtype)).reshape(self.shape)


@dataclass(frozen=True)
class Packing:
    """Kernel operands for a [rows, cols] weight: levels int32 [rows, copies * cols] in [0, 16), scales
    and zeros float32 [rows, copies * cols / 32]; inputs enter as `expand` lays them out."""

    levels: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    chunk: int
    coefs: tuple[float, ...]


def expand(x: torch.Tensor, chunk: int, coefs: tuple[float, ...]) -> torch.Tensor:
    """[m, cols] -> [m, copies * cols]: every chunk of inputs repeated once per coefficient, scaled by it."""
    if coefs == (1.0,):
        return x
    rows, cols = x.shape
    parts = x.reshape(rows, cols // chunk, 1, chunk)
    copies = [parts if c == 1 else torch.zeros_like(parts) if c == 0 else parts * c for c in coefs]
    return torch.cat(copies, dim=2).reshape(rows, len(coefs) * cols)


def collapse(values: torch.Tensor, chunk: int, coefs: tuple[float, ...]) -> torch.Tensor:
    """The transpose of `expand`: per-position weights [n, copies * cols] -> the weights [n, cols]."""
    if coefs == (1.0,):
        return values
    rows, width = values.shape
    parts = values.reshape(rows, width // (len(coefs) * chunk), len(coefs), chunk)
    weights = sum(parts[:, :, i] * c for i, c in enumerate(coefs) if c != 0)
    return weights.reshape(rows, width // len(coefs))


def pack_thirty_two(weight: GGMLTensor) -> Packing:
    """The kernel operands for a weight of a type with 32-input groups (THIRTY_TWO_TYPES)."""
    levels, scales, zeros = _planes(weight)
    return Packing(levels, scales, zeros, weight.shape[1], (1.0,) * (levels.shape[1] // weight.shape[1]))


def _planes(weight: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scales, zeros) for the 32-input types. With w = s (u - offset) + r (r = 0 for the symmetric
    types), a 4-bit type is one copy, a wider one a high and a low copy:

    | copy        | q                      | scale | zero    |
    |-------------|------------------------|-------|---------|
    | one (4-bit) | u                      | s     | (8 - offset) s + r |
    | high        | u >> 4 + 8 - offset/16 | 16 s  | 0       |
    | low         | u & 15                 | s     | 8 s + r |
    """
    levels, scales, residuals = _affine(weight)
    offset = _FORMATS[weight.qtype][1]
    if _FORMATS[weight.qtype][0] <= 4:
        return levels, scales, (8 - offset) * scales + residuals
    high, low = (levels >> 4) + 8 - offset // 16, levels & 15
    return (torch.cat([high, low], dim=1), torch.cat([16 * scales, scales], dim=1),
            torch.cat([torch.zeros_like(scales), 8 * scales + residuals], dim=1))


def _affine(weight: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u int32 [rows, cols], s and r float32 [rows, cols / 32]) with w = s (u - offset) + r per group."""
    _, offset, unit_header = _FORMATS[weight.qtype]
    rows, cols = weight.shape
    blocks = blocks_of(weight)
    levels = unit_levels(blocks, weight.qtype, {0: unit_header}) + offset
    d = half(blocks, 0)
    if weight.qtype in (Q.Q4_K, Q.Q5_K):
        sub_scales, sub_mins = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scales, residuals = d * sub_scales.astype(np.float32), -half(blocks, 2) * sub_mins.astype(np.float32)
    else:
        scales, residuals = d, np.zeros_like(d) if offset else half(blocks, 2)
    groups = cols // GROUP
    return (torch.from_numpy(levels.reshape(rows, cols)), torch.from_numpy(scales.reshape(rows, groups)),
            torch.from_numpy(residuals.reshape(rows, groups)))


def blocks_of(weight: GGMLTensor) -> np.ndarray:
    """The weight's blocks, one per row of a uint8 [num_blocks, block_bytes] array."""
    return weight.blocks.reshape(-1, gguf.GGML_QUANT_SIZES[weight.qtype][1])


def unit_levels(blocks: np.ndarray, qtype: Q, replaced: dict[int, bytes]) -> np.ndarray:
    """gguf's dequantization of `blocks` with the bytes from each offset in `replaced` overwritten, as int32:
    with unit scales and zero offsets written over the block's own, its integer levels."""
    return np.rint(dequantize_with(blocks, qtype, replaced)).astype(np.int32)


def dequantize_with(blocks: np.ndarray, qtype: Q, replaced: dict[int, bytes]) -> np.ndarray:
    """gguf's dequantization (float32 [num_blocks, values]) of `blocks` with some bytes overwritten.
    The blocks go in as one row: gguf loops in Python over groups of 16 rows, which with a row a block
    cost ~10 s per load of the default model; its arithmetic is per block, so the values are the same."""
    unit = blocks.copy()
    for at, data in replaced.items():
        unit[:, at:at + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return gguf.quants.dequantize(unit.reshape(1, -1), qtype).reshape(len(unit), -1)


def half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [blocks, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)
