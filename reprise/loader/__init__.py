"""Model loading: GGUF files and Hugging Face directories to a config, lazy weights and a tokenizer."""
from reprise.loader.default import LoadedModel, default_model_path, load_model
from reprise.loader.errors import LoadError
from reprise.loader.tokenizer import ReplyMemory, Tokenizer, chat_prompt_ids

__all__ = ["LoadError", "LoadedModel", "ReplyMemory", "Tokenizer", "chat_prompt_ids", "default_model_path",
           "load_model"]
