"""Native GGUF weights: the int4 plane repacking is exact, the kernel's error is bfloat16's, and models
served from quantized weights match the dequantized reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from reprise import LLM, SamplingParams
from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from reprise.engine.startup import resolve_weights
from reprise.models.layers.quant import (GROUP, NATIVE_TYPES, GGMLTensor, QuantizedEmbedding,
                                         QuantizedLinear, SharedEmbedding, StackedLinear, pack)
from reprise.models.layers.quant.formats import collapse, expand
from reprise.models.layers.quant.kernel import int4_kernel_loaded
from tests.loader.loader_testing import FFN, HEADS, HIDDEN, KV_HEADS, encode_as, tiny_qwen2_tensors, write_gguf
from tests.models.helpers import engine_logits

NATIVE = sorted(NATIVE_TYPES, key=lambda qtype: qtype.name)


def quantized(qtype: Q, rows: int = 64, cols: int = 256, seed: int = 0) -> GGMLTensor:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    return GGMLTensor(encode_as(values, qtype, rng), qtype, (rows, cols))


@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
def test_packing_reconstructs_the_dequantized_weight_exactly(qtype):
    weight = quantized(qtype)
    packing = pack(weight)
    rows = weight.shape[0]
    values = (packing.levels.view(rows, -1, GROUP).float() - 8) * packing.scales[..., None] + packing.zeros[..., None]
    assert packing.levels.min() >= 0 and packing.levels.max() <= 15
    assert torch.equal(collapse(values.view(rows, -1), packing.chunk, packing.coefs), weight.dequantize())


@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
def test_kernel_error_is_that_of_bfloat16_weights(qtype):
    """Rounding scales to bfloat16 costs what rounding every weight to bfloat16 costs, within 2x."""
    weight = quantized(qtype)
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    exact = x.float() @ weight.dequantize().t()
    dense_error = (torch.nn.functional.linear(x, weight.dequantize().bfloat16()).float() - exact).abs().max()
    native_error = (QuantizedLinear(weight)(x).float() - exact).abs().max()
    assert native_error <= 2 * dense_error + 1e-3


@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
def test_prefill_rows_unpack_to_the_bfloat16_weight(qtype):
    """From `dense_from_rows` rows on, W is unpacked for a dense matmul: bit for bit the packing's float32
    q s + (z - 8 s) with the kernel's bfloat16 scales and zeros, collapsed, rounded once to bfloat16 (so no
    output moves with how it is unpacked), and within bfloat16's rounding of the dequantized weight."""
    weight = quantized(qtype)
    layer, packing = QuantizedLinear(weight), pack(weight)
    scales, zeros = packing.scales.bfloat16().float(), packing.zeros.bfloat16().float()
    levels = packing.levels.view(64, -1, GROUP).float()
    values = torch.addcmul((zeros - 8 * scales)[..., None], levels, scales[..., None])
    expected = collapse(values.view(64, -1), packing.chunk, packing.coefs).bfloat16()
    reference = weight.dequantize()
    assert layer.dense_ok
    assert torch.equal(layer.unpack().t().view(torch.int16), expected.view(torch.int16))
    assert torch.allclose(layer.unpack().t().float(), reference, rtol=2 ** -7,
                          atol=2 ** -7 * reference.abs().max().item())
    x = torch.randn(layer.dense_from_rows, weight.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, expected))
    exact = x.float() @ reference.t()
    dense_error = (torch.nn.functional.linear(x, reference.bfloat16()).float() - exact).abs().max()
    assert (layer(x).float() - exact).abs().max() <= 2 * dense_error + 1e-3


def test_prefill_unpacks_the_weight_in_tiles(monkeypatch):
    layer = QuantizedLinear(quantized(Q.Q6_K, rows=192))
    x = torch.randn(layer.dense_from_rows, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    whole = layer(x)
    monkeypatch.setattr("reprise.models.layers.quant.linear._DENSE_TILE", 64)
    assert torch.equal(layer(x), whole)


@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
def test_held_bytes_per_weight(qtype):
    """4 bits a kernel position plus a bfloat16 scale and zero per 32 positions: 5 bits a weight for the
    4-bit types (one position each), 10 for the others (two)."""
    layer = QuantizedLinear(quantized(qtype))
    bits = 8 * sum(t.numel() * t.element_size() for t in layer.buffers()) / (64 * 256)
    assert bits == (5.0 if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else 10.0)


# max |y - x W^T| against the float32 dequantized reference, 16 bfloat16 rows times a random 128 x 256 weight,
# measured with reprise's kernel (int4mm.cpp); aten's kernel gives the same maxima (the two differ in at most one
# output of 2048, by one bfloat16 rounding), a dense matmul with bfloat16 weights 0.0256 (Q2_K) to 2.7437 (Q6_K).
OWN_KERNEL_ERRORS = {Q.Q2_K: 0.0295, Q.Q3_K: 0.0912, Q.Q4_0: 0.2005, Q.Q4_1: 0.1918, Q.Q4_K: 0.6161, Q.Q5_0: 0.2075,
                     Q.Q5_1: 0.2547, Q.Q5_K: 1.3621, Q.Q6_K: 2.7438, Q.Q8_0: 0.1783}
own_kernel = pytest.mark.skipif(not int4_kernel_loaded(), reason="needs AVX-512 BF16 and a compiler")


@own_kernel
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
def test_own_kernel_error_is_stated_and_matches_aten(qtype):
    weight = quantized(qtype, rows=128)
    layer = QuantizedLinear(weight)
    x = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = layer(x)
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(expand(x, layer.chunk, layer.coefs), layer.packed, GROUP,
                                                      layer.scales_zeros.view(torch.bfloat16))
    assert layer.own_kernel
    assert (ours.float() - x.float() @ weight.dequantize().t()).abs().max() <= OWN_KERNEL_ERRORS[qtype]
    assert (ours != aten).sum() <= 1 and torch.allclose(ours, aten, rtol=2 ** -7, atol=0)


@own_kernel
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K], ids=lambda q: q.name)
def test_own_kernel_rows_do_not_depend_on_the_batch(qtype):
    """Rows go through registers 4 at a time (tails of 1-3): every split gives each row the same bits."""
    layer = QuantizedLinear(quantized(qtype, rows=128))
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    whole = layer(x)
    for rows in (1, 2, 3, 5, 8, 13, 16):
        assert torch.equal(layer(x[:rows]), whole[:rows])
        assert torch.equal(layer(x[rows:rows + 1]), whole[rows:rows + 1])


def test_quantized_embedding_rows_are_dequantized_rows():
    weight = quantized(Q.Q8_0, rows=48)
    embedding = QuantizedEmbedding(weight).to(torch.float32)
    ids = torch.tensor([[3, 0], [47, 3]])
    assert torch.equal(embedding(ids), weight.dequantize()[ids])


def test_quantized_linear_keeps_its_bias_and_scales_under_to_dtype():
    bias = torch.nn.Parameter(torch.arange(64.0))
    layer = QuantizedLinear(quantized(Q.Q4_0), bias).to(torch.float32)
    assert layer.scales_zeros.dtype == torch.int16
    out = layer(torch.zeros(2, 256))
    assert out.dtype == torch.float32 and torch.equal(out, bias.detach().expand(2, 64))


def tiny_logits(qtype: Q, tmp_path, **engine) -> torch.Tensor:
    """Logits of a one-layer qwen2 whose 2-D weights are stored as `qtype`, for 32 prompt + 8 decode tokens."""
    path = tmp_path / f"{qtype.name}.gguf"
    if not path.exists():
        write_gguf(str(path), "qwen2", tiny_qwen2_tensors(qtype, np.random.default_rng(0)),
                   num_layers=1, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    return engine_logits(Engine(EngineConfig(model=str(path), kv_cache_bytes=2**20, **engine)), ids, 32).float()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K],
                         ids=lambda q: q.name)
def test_tiny_gguf_native_logits_are_as_close_as_bfloat16_weights(qtype, tmp_path):
    """Random weights make these models ill-conditioned (bf16 rounding alone moves a logit by up to a third
    of its scale), so the bound is relative: native's mean error at most twice dequantized bf16's."""
    reference = tiny_logits(qtype, tmp_path, dtype="float32", weights="float32")
    native = tiny_logits(qtype, tmp_path, dtype="bfloat16", weights="native")
    dense = tiny_logits(qtype, tmp_path, dtype="bfloat16", weights="bfloat16")
    assert (native - reference).abs().mean() <= 2 * (dense - reference).abs().mean()


def test_type_without_a_kernel_form_falls_back_to_dequantized_weights(tmp_path):
    native = tiny_logits(Q.TQ1_0, tmp_path, dtype="float32", weights="native")
    assert torch.equal(native, tiny_logits(Q.TQ1_0, tmp_path, dtype="float32", weights="float32"))


@pytest.fixture(scope="module")
def native_llm() -> LLM:
    return LLM(weights="native", kv_cache_bytes="64MiB")


def test_default_model_native_weights_are_smaller_and_close_to_the_reference(native_llm):
    """Teacher-forced on the float32 reference's greedy tokens: logits within bf16's distance of it."""
    reference = Engine(EngineConfig(dtype="float32", weights="float32", kv_cache_bytes=16 * 2**20))
    prompt = reference.tokenizer.encode("The history of the printing press begins with")
    ids = prompt + reference_greedy(reference, prompt, 32)
    expected = engine_logits(reference, ids, len(prompt))
    ours = engine_logits(native_llm.engine, ids, len(prompt)).float()
    assert native_llm.weights_bytes < 0.5 * reference.weights_bytes
    assert (ours - expected).abs().max() < 2.0
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def reference_greedy(engine: Engine, prompt: list[int], num_tokens: int) -> list[int]:
    request = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True))
    while True:
        for output in engine.step():
            if output.request_id == request.request_id and output.finished:
                return list(output.token_ids)


def test_default_model_native_greedy_equals_dequantized_bfloat16(native_llm):
    """64 greedy tokens, native against weights dequantized to bfloat16 (the same compute dtype)."""
    dense = LLM(weights="bfloat16", kv_cache_bytes="64MiB")
    prompt = "The history of the printing press begins with"
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    assert native_llm.generate(prompt, params)[0].token_ids == dense.generate(prompt, params)[0].token_ids


def test_native_weights_hot_equals_cold(native_llm):
    cold = LLM(weights="native", kv_cache_bytes="64MiB", prefix_cache=False)
    prompt = "Explain why the sky is blue, in three short sentences, for a curious child who asks a lot."
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = cold.generate(prompt, params)[0]
    native_llm.generate(prompt, params)
    hot = native_llm.generate(prompt, params)[0]
    assert hot.cached_tokens == len(hot.prompt_token_ids) - 1
    assert hot.token_ids == expected.token_ids


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K, Q.Q2_K], ids=lambda q: q.name)
def test_shared_embedding_reads_rows_of_the_packed_head(qtype):
    """A tied table is held once: lookups read the head's planes, with its bfloat16 scales and zeros."""
    weight = quantized(qtype, rows=128, cols=256)
    head = QuantizedLinear(weight)
    embedding = SharedEmbedding(head).to(torch.float32)
    ids = torch.tensor([[0, 127], [64, 33]])
    eye = torch.eye(256, dtype=torch.bfloat16)
    columns = head(eye).float().t()          # W^T's columns: each row of W as the kernel sees it
    assert torch.allclose(embedding(ids), columns[ids], rtol=1e-2, atol=1e-2)
    assert (embedding(ids) - weight.dequantize()[ids]).abs().max() < 0.02 * weight.dequantize().abs().max()


def test_weights_choice_resolves_per_format_device_and_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights(None, None, torch.bfloat16, True, cpu)              # the default for GGUF in bf16
    assert not resolve_weights(None, "float32", torch.float32, True, cpu)      # float32 asked: dense float32
    assert resolve_weights("native", "float32", torch.float32, True, cpu)
    assert not resolve_weights("native", None, torch.bfloat16, False, cpu)     # a model directory is dense
    assert not resolve_weights("native", None, torch.bfloat16, True, cuda)     # CPU kernels only
    assert not resolve_weights("bfloat16", None, torch.bfloat16, True, cpu)
    with pytest.raises(ValueError, match="compute dtype"):
        resolve_weights("float32", "bfloat16", torch.bfloat16, True, cpu)
    with pytest.raises(ValueError, match="unknown weights"):
        resolve_weights("int4", None, torch.bfloat16, True, cpu)


def mixed_gguf(tmp_path, base: Q, overrides: dict[str, Q]) -> str:
    """The tiny qwen2 in `base`, with the named 2-D weights stored as another type (a K-quant mix)."""
    path = tmp_path / f"{base.name}-{'-'.join(overrides)}.gguf"
    if not path.exists():
        rng = np.random.default_rng(0)
        tensors = tiny_qwen2_tensors(base, rng)
        for part, qtype in overrides.items():          # every weight has HIDDEN (= FFN) inputs
            rows = len(tensors[f"blk.0.{part}.weight"][0])
            values = rng.standard_normal((rows, HIDDEN)).astype(np.float32)
            tensors[f"blk.0.{part}.weight"] = (encode_as(values, qtype, rng), qtype)
        write_gguf(str(path), "qwen2", tensors, num_layers=1, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN)
    return str(path)


# Q4_K_M as llama.cpp writes it: Q4_K, attn_v and some ffn_down Q6_K; a Q5_K gate next to a Q6_K up fuses mixed
MIXES = {"Q4_K_M": (Q.Q4_K, {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K}), "Q5_K_up": (Q.Q5_K, {"ffn_up": Q.Q6_K})}


@pytest.mark.parametrize("mix", MIXES)
def test_fused_parts_of_different_types_stay_native(mix, tmp_path):
    """Each run of parts of one type is its own QuantizedLinear; logits as close to the float32 reference as
    the single-type files' (native's mean error at most twice dequantized bf16's)."""
    path = mixed_gguf(tmp_path, *MIXES[mix])
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {weights: engine_logits(Engine(EngineConfig(model=path, weights=weights, kv_cache_bytes=2**20,
                                                         dtype="float32" if weights == "float32" else "bfloat16")),
                                     ids, 32).float() for weights in ("float32", "native", "bfloat16")}
    errors = {weights: (logits[weights] - logits["float32"]).abs().mean() for weights in ("native", "bfloat16")}
    assert errors["native"] <= 2 * errors["bfloat16"]
    layer = Engine(EngineConfig(model=path, weights="native", kv_cache_bytes=2**20)).runner.model.layers[0]
    fused = layer.mlp.gate_up_proj if mix == "Q5_K_up" else layer.self_attn.qkv_proj
    assert type(fused) is StackedLinear and [type(p) for p in fused.parts] == [QuantizedLinear, QuantizedLinear]


def test_q4_k_m_weights_bytes_are_native(tmp_path):
    """Held bytes, counted by hand: 5 bits a Q4_K weight (q, k, o, gate, up), 10 a Q6_K one (v, down), the
    262-row embedding's own blocks (262 rows do not pack), the 262-row head dense bf16, norms and biases bf16."""
    path = mixed_gguf(tmp_path, *MIXES["Q4_K_M"])
    engine = Engine(EngineConfig(model=path, weights="native", kv_cache_bytes=2**20))
    q4_k_rows, q6_k_rows = HIDDEN + KV_HEADS * 64 + HIDDEN + 2 * FFN, KV_HEADS * 64 + HIDDEN
    packed = q4_k_rows * HIDDEN * 5 // 8 + q6_k_rows * HIDDEN * 10 // 8
    embedding, head = 262 * 144, 262 * HIDDEN * 2
    vectors = 2 * (3 * HIDDEN + HIDDEN + 2 * KV_HEADS * 64)
    assert engine.weights_bytes == packed + embedding + head + vectors == 481632


def test_fused_part_without_a_kernel_form_is_held_dense_beside_the_packed_ones(tmp_path):
    path = mixed_gguf(tmp_path, Q.Q4_K, {"attn_v": Q.TQ1_0})
    model = Engine(EngineConfig(model=path, weights="native", kv_cache_bytes=2**20)).runner.model
    qkv = model.layers[0].self_attn.qkv_proj
    assert [type(p) for p in qkv.parts] == [QuantizedLinear, torch.nn.Linear]
    assert qkv.parts[1].weight.dtype == torch.bfloat16 and qkv.out_features == HIDDEN + 2 * KV_HEADS * 64
