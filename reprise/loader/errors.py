"""LoadError: why a model could not be loaded, in one line."""
from __future__ import annotations


class LoadError(Exception):
    """A model, its weights or its tokenizer could not be loaded.

    The message is one line that names the problem and the file, e.g.
    "model file not found: /x/y.gguf". Callers show it as is.
    """
