"""reprise: an LLM inference server and library built around the prefix cache."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "ChatSession", "SamplingParams", "RequestOutput", "FinishReason"]

_HOMES = {"LLM": "reprise.llm", "ChatSession": "reprise.llm", "SamplingParams": "reprise.engine.request",
          "RequestOutput": "reprise.engine.request", "FinishReason": "reprise.engine.request"}


def __getattr__(name: str):
    """Imported on first use, so `reprise.cache` and the CLI's --help load no model code."""
    if name in _HOMES:
        import importlib
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'reprise' has no attribute {name!r}")
