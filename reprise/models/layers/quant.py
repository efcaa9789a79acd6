"""GGUF weights kept quantized: repacked exactly into PyTorch's int4 groupwise CPU matmul.

Every type in NATIVE_TYPES is affine per group of 32 inputs: w = s * u + m, with an integer level u in
[0, 2^bits) and a per-group scale s and offset m read from the file:

| type | bits | s        | m             |
|------|------|----------|---------------|
| Q4_0 | 4    | d        | -8 d          |
| Q4_1 | 4    | d        | m             |
| Q4_K | 4    | d * sc_j | -dmin * min_j |
| Q5_0 | 5    | d        | -16 d         |
| Q5_1 | 5    | d        | m             |
| Q5_K | 5    | d * sc_j | -dmin * min_j |
| Q8_0 | 8    | d        | -128 d        |

`_weight_int4pack_mm_for_cpu` computes w = (q - 8) * scale + zero, q in [0, 16), per group of 32. A
4-bit type is one such plane; a wider type splits u = 16 hi + lo into two planes laid side by side
along the input dimension and fed the input twice ([x, x]); see `_planes` for the scales and zeros.
Both are exact in real arithmetic; the kernel takes scales and zeros in bfloat16, which rounds them to
8 significant bits, as dequantizing to bfloat16 rounds every weight. The kernel's float32 path is
10-70x slower than its bfloat16 one on x86, so activations are rounded to bfloat16 for the matmul
whatever the compute dtype. A tied embedding table is held once, as the head's planes
(SharedEmbedding reads rows out of them).

Other types (Q2_K, Q3_K, Q6_K have 16-element groups; IQ*, TQ*, floats) have no exact plane form;
the loader dequantizes them to the compute dtype, one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

GROUP = 32                  # inputs per scale/zero group, in the file and in the kernel
_PACK_ROWS = 4096           # rows packed at a time, bounding the int32 scratch; packing is row-local
_ROW_BLOCK = 64             # rows the CPU packing interleaves
_ONE, _ZERO = np.float16(1).tobytes(), np.float16(0).tobytes()
# sub-block scales all 1, mins all 0 (see gguf.quants.Q4_K.get_scale_min for the bit layout)
_K_UNIT_SCALES = bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
# type -> (bits, what gguf's dequantize subtracts from the level, a header that makes it yield u - offset)
_FORMATS = {
    Q.Q4_0: (4, 8, _ONE), Q.Q5_0: (5, 16, _ONE), Q.Q8_0: (8, 128, _ONE),
    Q.Q4_1: (4, 0, _ONE + _ZERO), Q.Q5_1: (5, 0, _ONE + _ZERO),
    Q.Q4_K: (4, 0, _ONE + _ZERO + _K_UNIT_SCALES), Q.Q5_K: (5, 0, _ONE + _ZERO + _K_UNIT_SCALES),
}
NATIVE_TYPES = frozenset(_FORMATS)


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


def can_pack(tensor: GGMLTensor) -> bool:
    """Whether QuantizedLinear can hold this weight (the kernel also needs rows in multiples of 16)."""
    return tensor.qtype in NATIVE_TYPES and tensor.shape[0] % 16 == 0 and tensor.shape[1] % GROUP == 0


class QuantizedLinear(nn.Module):
    """y = x W^T (+ bias) with W packed as int4 planes; W is never materialized.

    Buffers: `packed` (uint8, the kernel's layout) and `scales_zeros`, bfloat16 [groups, out, 2] stored
    as its int16 bits so that `Module.to(dtype)` leaves it alone.
    """

    def __init__(self, weight: GGMLTensor, bias: nn.Parameter | None = None):
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"no int4 plane form for {weight.qtype.name} weight of shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        bits = _FORMATS[weight.qtype][0]
        self.num_planes = 1 if bits <= 4 else 2
        packed, scales_zeros = [], []
        for start in range(0, self.out_features, _PACK_ROWS):
            rows = GGMLTensor(weight.blocks[start:start + _PACK_ROWS], weight.qtype,
                              (min(_PACK_ROWS, self.out_features - start), self.in_features))
            levels, scales, zeros = _planes(rows)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1))
            scales_zeros.append(torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).transpose(0, 1))
        self.register_buffer("packed", torch.cat(packed))
        self.register_buffer("scales_zeros", torch.cat(scales_zeros, dim=1).contiguous().view(torch.int16))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.num_planes == 2:
            flat = torch.cat([flat, flat], dim=-1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP,
                                                          self.scales_zeros.view(torch.bfloat16))
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (float32 [len(ids), in_features]), read from the packed planes: the kernel packs
        each 64 rows as [planes * in_features, 32] bytes, row j of a block in column j % 32, low nibble
        for j < 32 (checked by `rows_readable`)."""
        width = self.num_planes * self.in_features
        blocks, within = ids // _ROW_BLOCK, ids % _ROW_BLOCK
        packed = self.packed.view(-1, width, _ROW_BLOCK // 2)[blocks, :, within % (_ROW_BLOCK // 2)]
        levels = torch.where((within >= _ROW_BLOCK // 2)[:, None], packed >> 4, packed & 15).float()
        scales, zeros = self.scales_zeros.view(torch.bfloat16)[:, ids].float().permute(2, 1, 0)
        values = (levels - 8) * scales.repeat_interleave(GROUP, 1) + zeros.repeat_interleave(GROUP, 1)
        return values.view(len(ids), self.num_planes, self.in_features).sum(1)


class SharedEmbedding(nn.Module):
    """The input embedding of a tied model, looked up in its output head's packed planes: one copy of the
    table serves both. Returns the compute dtype, read from `dtype_probe` (see QuantizedEmbedding)."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        self.head = head
        self.register_buffer("dtype_probe", torch.empty(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        values = self.head.rows(input_ids.reshape(-1))
        return values.to(self.dtype_probe.dtype).reshape(*input_ids.shape, self.head.in_features)


def rows_readable(tensor: GGMLTensor) -> bool:
    """Whether QuantizedLinear.rows can read this weight: whole 64-row blocks, and this torch packs as
    `rows` assumes (probed once)."""
    return can_pack(tensor) and tensor.shape[0] % _ROW_BLOCK == 0 and _packing_is_row_blocked()


@lru_cache(maxsize=1)
def _packing_is_row_blocked() -> bool:
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (2 * _ROW_BLOCK, 2 * GROUP), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
    ids = torch.arange(2 * _ROW_BLOCK)
    columns = packed.view(2, 2 * GROUP, _ROW_BLOCK // 2)[ids // _ROW_BLOCK, :, ids % (_ROW_BLOCK // 2)]
    unpacked = torch.where((ids % _ROW_BLOCK >= _ROW_BLOCK // 2)[:, None], columns >> 4, columns & 15)
    return torch.equal(unpacked.int(), levels)


class QuantizedEmbedding(nn.Module):
    """Row lookup in a GGUF-quantized table: only the looked-up rows are dequantized, per call.

    Returns the compute dtype, read from `dtype_probe`, an empty float buffer `Module.to` converts.
    """

    def __init__(self, weight: GGMLTensor):
        super().__init__()
        self.qtype, self.embedding_dim = weight.qtype, weight.shape[1]
        self.register_buffer("blocks", torch.from_numpy(np.ascontiguousarray(weight.blocks)))
        self.register_buffer("dtype_probe", torch.empty(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[input_ids.reshape(-1).cpu()].numpy()
        values = torch.from_numpy(gguf.quants.dequantize(rows, self.qtype)).reshape(-1, self.embedding_dim)
        return values.to(self.dtype_probe.dtype).reshape(*input_ids.shape, self.embedding_dim)


def weights_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy (every buffer a model holds is a weight)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _planes(weight: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [rows, planes * cols], scales and zeros float32 [rows, planes * cols / 32]) in the
    kernel's convention. With w = s (u - offset) + r (r = 0 for the symmetric types), zeros are chosen
    so that rounding them to bfloat16 adds nothing beyond rounding s, wherever r = 0:

    | plane       | q                      | scale | zero    |
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
    _, block_bytes = gguf.GGML_QUANT_SIZES[weight.qtype]
    blocks = weight.blocks.reshape(-1, block_bytes)
    unit = blocks.copy()
    unit[:, :len(unit_header)] = np.frombuffer(unit_header, dtype=np.uint8)
    levels = np.rint(gguf.quants.dequantize(unit, weight.qtype)).astype(np.int32) + offset
    d = _half(blocks, 0)
    if weight.qtype in (Q.Q4_K, Q.Q5_K):
        sub_scales, sub_mins = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scales, residuals = d * sub_scales.astype(np.float32), -_half(blocks, 2) * sub_mins.astype(np.float32)
    else:
        scales, residuals = d, np.zeros_like(d) if offset else _half(blocks, 2)
    groups = cols // GROUP
    return (torch.from_numpy(levels.reshape(rows, cols)), torch.from_numpy(scales.reshape(rows, groups)),
            torch.from_numpy(residuals.reshape(rows, groups)))


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [blocks, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)
