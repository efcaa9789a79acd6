"""Loader fixtures: the default model and transformers' tokenizer for it, each loaded once."""
from __future__ import annotations

import os

import gguf
import pytest

from reprise.loader import default_model_path


@pytest.fixture(scope="session")
def default_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def default_reader(default_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(default_path)


@pytest.fixture(scope="session")
def default_weights(default_model) -> dict:
    return dict(default_model.weights())


@pytest.fixture(scope="session")
def reference_tokenizer(default_path):
    """transformers' tokenizer built from the same GGUF file: the reference for ids and templates."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(default_path), gguf_file=os.path.basename(default_path))
