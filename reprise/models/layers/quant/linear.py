"""GGUF weights kept quantized, multiplied by reprise's or PyTorch's int4 groupwise CPU kernel.

formats.py and sixteen.py repack each type exactly into the kernel's operands. The kernel's float32
path is 10-70x slower than its bfloat16 one on x86, so activations are rounded to bfloat16 for the
matmul whatever the compute dtype. A tied embedding table is held once, as the head's operands
(SharedEmbedding reads rows out of them). A fused projection whose parts differ in type is a
StackedLinear of per-type layers. Types with no kernel form (IQ*, TQ*, floats) are dequantized by the
loader to the compute dtype, one tensor at a time.
"""
from __future__ import annotations

from functools import lru_cache

import gguf
import numpy as np
import torch
from torch import nn

from reprise.models.layers.quant.formats import (GROUP, NATIVE_TYPES, SIXTEEN_TYPES, GGMLTensor, Packing, collapse,
                                                 expand, pack_thirty_two)
from reprise.models.layers.quant.kernel import int4_kernel_loaded
from reprise.models.layers.quant.sixteen import pack_sixteen

_PACK_ROWS = 4096           # rows packed at a time, bounding the int32 scratch; packing is row-local
_ROW_BLOCK = 64             # rows the CPU packing interleaves
# rows from which unpacking W for a dense matmul beats the kernel, measured on 2 cores per shape of the
# default model (ms, kernel / unpack + dense): 3072 x 576 at 80 rows 1.72 / 1.75, at 96 2.04 / 1.90;
# 576 x 1536 at 96 1.10 / 1.04; 960 x 576 at 112 0.73 / 0.64; 576 x 576 at 128 0.51 / 0.49. Summed over
# a layer's four, the two paths tie near 96 rows (4.29 / 4.22 ms).
DENSE_FROM_ROWS = 96
# the same crossover with reprise's kernel (kernel.py), which unpacks each weight once per call: a layer's
# four matmuls (ms, kernel / unpack + dense) 21.0 / 22.2 at 768 rows, 29.1 / 27.5 at 1024; at 512 rows
# 17.8 / 19.9 (3072 x 576 9.66 / 10.97, 576 x 1536 2.95 / 2.94). A default step (512 tokens) stays in the kernel.
OWN_KERNEL_DENSE_FROM_ROWS = 768
_DENSE_TILE = 2048          # weight rows unpacked at a time for a dense matmul, bounding the scratch


def pack(weight: GGMLTensor) -> Packing:
    """The kernel operands for a weight of a type in NATIVE_TYPES."""
    return pack_sixteen(weight) if weight.qtype in SIXTEEN_TYPES else pack_thirty_two(weight)


def can_pack(tensor: GGMLTensor) -> bool:
    """Whether QuantizedLinear can hold this weight (the kernel also needs rows in multiples of 16)."""
    return tensor.qtype in NATIVE_TYPES and tensor.shape[0] % 16 == 0 and tensor.shape[1] % GROUP == 0


class QuantizedLinear(nn.Module):
    """y = x W^T (+ bias) with W packed as int4 kernel operands (formats.py); W is never held dense.

    Buffers: `packed` (uint8, the kernel's layout) and `scales_zeros`, bfloat16 [groups, out, 2] stored
    as its int16 bits so that `Module.to(dtype)` leaves it alone. Inputs enter as `expand` lays them
    out, with `chunk` and `coefs` from the packing. The matmul is reprise's kernel (`reprise::int4_mm`,
    kernel.py) where `own_kernel` (the CPU has AVX-512 BF16 and the kernel built), else aten's. A call
    with at least `dense_from_rows` rows (a long prefill chunk) unpacks W to bfloat16 for that call and
    runs a dense matmul: aten's kernel unpacks the weight again for every few rows (at 512 rows 1.8x
    slower than one unpacking plus a dense matmul, so from DENSE_FROM_ROWS), reprise's once per call
    (from OWN_KERNEL_DENSE_FROM_ROWS).
    """

    def __init__(self, weight: GGMLTensor, bias: nn.Parameter | None = None):
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"no int4 kernel form for {weight.qtype.name} weight of shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        packed, scales_zeros = [], []
        for start in range(0, self.out_features, _PACK_ROWS):
            rows = GGMLTensor(weight.blocks[start:start + _PACK_ROWS], weight.qtype,
                              (min(_PACK_ROWS, self.out_features - start), self.in_features))
            packing = pack(rows)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(packing.levels, 1))
            scales_zeros.append(torch.stack([packing.scales, packing.zeros], -1).to(torch.bfloat16).transpose(0, 1))
        self.chunk, self.coefs = packing.chunk, packing.coefs
        self.register_buffer("packed", torch.cat(packed))
        self.register_buffer("scales_zeros", torch.cat(scales_zeros, dim=1).contiguous().view(torch.int16))
        self.dense_ok = self.out_features % _ROW_BLOCK == 0 and _packing_is_row_blocked()
        self.own_kernel = self.dense_ok and int4_kernel_loaded()
        self.dense_from_rows = OWN_KERNEL_DENSE_FROM_ROWS if self.own_kernel else DENSE_FROM_ROWS
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        # the compiled decode graph (layers/compiled.py) holds decode rows only, however many
        if self.dense_ok and not torch.compiler.is_compiling() and flat.shape[0] >= self.dense_from_rows:
            tiles = [flat @ self.unpack(start, start + _DENSE_TILE)
                     for start in range(0, self.out_features, _DENSE_TILE)]
            out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)
        elif self.own_kernel:
            out = torch.ops.reprise.int4_mm(expand(flat, self.chunk, self.coefs).contiguous(), self.packed,
                                            self.scales_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(expand(flat, self.chunk, self.coefs), self.packed,
                                                              GROUP, self.scales_zeros.view(torch.bfloat16))
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def unpack(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of W (start a multiple of 64), transposed: bfloat16 [in_features, stop - start],
        bit for bit `_weights` rounded to bfloat16. The kernel packs each 64 rows as [positions, 32] bytes,
        row j of a block in column j % 32, low nibble for j < 32 (checked by `_packing_is_row_blocked`): W^T
        is those bytes' nibbles with blocks and positions swapped, moved in runs of 32 bytes, and every float32
        pass after that runs over contiguous memory, a group's scale and offset broadcast along its positions.
        The matmul takes W^T as it takes W, bit for bit."""
        stop = min(self.out_features if stop is None else stop, self.out_features)
        packed = self.packed.view(-1, self.num_positions, _ROW_BLOCK // 2)[start // _ROW_BLOCK:stop // _ROW_BLOCK]
        levels = torch.empty(self.num_positions, len(packed), 2, _ROW_BLOCK // 2, dtype=torch.uint8)
        levels[:, :, 0] = (packed & 15).transpose(0, 1)
        levels[:, :, 1] = (packed >> 4).transpose(0, 1)
        scales_zeros = self.scales_zeros.view(torch.bfloat16)[:, start:stop].float()
        scales = scales_zeros[..., 0].contiguous()
        offsets = torch.add(scales_zeros[..., 1], scales, alpha=-8)
        values = levels.view(-1, GROUP, stop - start).float().mul_(scales[:, None]).add_(offsets[:, None])
        return collapse(values.view(self.num_positions, -1).t(), self.chunk, self.coefs).t().to(torch.bfloat16)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (float32 [len(ids), in_features]), read from the packed operands as `unpack` reads
        them."""
        blocks, within = ids // _ROW_BLOCK, ids % _ROW_BLOCK
        packed = self.packed.view(-1, self.num_positions, _ROW_BLOCK // 2)[blocks, :, within % (_ROW_BLOCK // 2)]
        levels = torch.where((within >= _ROW_BLOCK // 2)[:, None], packed >> 4, packed & 15)
        return self._weights(levels, self.scales_zeros.view(torch.bfloat16)[:, ids])

    @property
    def num_positions(self) -> int:
        return self.scales_zeros.shape[0] * GROUP

    def _weights(self, levels: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
        """Weights float32 [rows, in] from levels [rows, positions] and their bfloat16 [groups, rows, 2]:
        (q - 8) s + z as one multiply-add, q s + (z - 8 s)."""
        scales, zeros = scales_zeros.float().permute(2, 1, 0).contiguous()
        groups = self.num_positions // GROUP
        values = torch.addcmul((zeros - 8 * scales)[..., None], levels.view(len(levels), groups, GROUP).float(),
                               scales[..., None])
        return collapse(values.view(len(levels), self.num_positions), self.chunk, self.coefs)


class StackedLinear(nn.Module):
    """A fused projection (qkv, gate_up) whose parts a GGUF file stores in different types: llama.cpp's
    Q4_K_M and Q5_K_M files write attn_v in Q6_K next to Q4_K/Q5_K q and k. Each run of adjacent parts of
    one type is its own layer (a QuantizedLinear, or an nn.Linear for a type with no kernel form) and
    their outputs are concatenated: y equals the parts' outputs side by side, and no part is held dense
    for its neighbour's sake. The fused bias, when there is one, is added once, after the concatenation."""

    def __init__(self, parts: list[nn.Module], bias: nn.Parameter | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([part(x) for part in self.parts], dim=-1)
        return out if self.bias is None else out + self.bias


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
