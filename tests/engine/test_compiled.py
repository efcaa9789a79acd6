"""Compiled decode (`compile=True`, reprise/models/layers/compiled.py) on a tiny random-weight Llama:
with compile on in both engines, greedy tokens with the cache on equal those with it off, an exact
repeat (hot) equals the first run (cold), and a batch equals each prompt run alone; the decode graph
compiles once, for every batch size, while the engine starts.

Inductor writes its kernels to a fresh directory, so this run pays the cold compile (~20 s here).
"""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from reprise import LLM, SamplingParams
from reprise.cli import build_parser, engine_config
from reprise.models.layers.compiled import DecodeGraph, cache_dir
from tests.models.test_hybrid_logits import tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
VOCAB = 320


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model(path, transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_hidden_layers=3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        options = dict(dtype="float32", kv_cache_bytes="8MiB", compile=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        llm = LLM(str(path), **options)
        # the engine's warm-up built the graph; a second engine of the same shapes reuses it
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
        yield llm, LLM(str(path), prefix_cache=False, **options)


def ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def test_compiled_decode_is_the_same_alone_batched_hot_and_cold(engines):
    llm, cold = engines
    prompts = [ids(1, 90), ids(2, 37), ids(3, 61)]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    alone = [llm.generate([prompt], GREEDY)[0] for prompt in prompts]
    batched = cold.generate(prompts, GREEDY)
    hot = llm.generate(prompts, GREEDY)
    assert [out.cached_tokens for out in hot] == [89, 36, 60]
    assert [out.token_ids for out in batched] == [out.token_ids for out in alone] == [out.token_ids for out in hot]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs      # none while serving
    llm.engine.cache.check_invariants()


def test_a_step_of_chunks_and_decodes_splits_them_and_changes_no_token(engines, monkeypatch):
    """A prompt admitted while another decodes: in that step its chunk runs eagerly and the decode
    through the graph; both give the tokens they give alone."""
    llm, cold = engines
    prompts = [ids(4, 70), ids(5, 45)]
    alone = [llm.generate([prompt], GREEDY)[0].token_ids for prompt in prompts]
    first_decodes = []
    run = DecodeGraph.__call__

    def spy(graph, model, input_ids, positions, caches, attention, logits_indices):
        first_decodes.append(attention.decode.q_start)
        return run(graph, model, input_ids, positions, caches, attention, logits_indices)
    monkeypatch.setattr(DecodeGraph, "__call__", spy)
    engine = cold.engine
    first = engine.add_request(prompts[0], GREEDY).request_id
    tokens: dict[str, list[int]] = {first: []}
    for _ in range(3):                                  # the prefill, then decodes
        for output in engine.step():
            tokens[output.request_id] += output.delta_token_ids
    second = engine.add_request(prompts[1], GREEDY).request_id
    tokens[second] = []
    while engine.has_work:
        for output in engine.step():
            tokens[output.request_id] += output.delta_token_ids
    assert [tokens[first], tokens[second]] == alone
    assert any(first_decodes)           # a step of chunk rows, then decode rows


def test_an_engine_whose_graph_does_not_build_decodes_eagerly(tmp_path, monkeypatch, caplog):
    def fails(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(DecodeGraph, "__call__", fails)
    tiny_model(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_hidden_layers=1))
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_bytes="8MiB", compile=True)
    assert llm.engine.runner.model.decode_graph is None
    assert "the decode graph did not build, decoding eagerly: RuntimeError: no C++ compiler" in caplog.text
    assert len(llm.generate([ids(6, 20)], GREEDY)[0].token_ids) == 12


def test_compile_flag_and_cache_dir(monkeypatch):
    parser = build_parser()
    assert engine_config(parser.parse_args(["generate", "--prompt", "x", "--compile"])).compile is True
    assert engine_config(parser.parse_args(["generate", "--prompt", "x", "--no-compile"])).compile is False
    assert engine_config(parser.parse_args(["generate", "--prompt", "x"])).compile is False
    assert engine_config(parser.parse_args(["serve"])).compile is True
    assert engine_config(parser.parse_args(["serve", "--no-compile"])).compile is False
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/kernels")
    assert cache_dir() == "/tmp/kernels"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert cache_dir().endswith(".cache/reprise/inductor")
