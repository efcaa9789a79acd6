"""reprise: an LLM inference server and library built around the prefix cache."""
from reprise.engine.request import FinishReason, RequestOutput, SamplingParams
from reprise.llm import LLM, ChatSession  # noqa: E402

__all__ = ["LLM", "ChatSession", "SamplingParams", "RequestOutput", "FinishReason"]
__version__ = "0.1.0"
