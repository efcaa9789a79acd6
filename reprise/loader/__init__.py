"""Model loading: GGUF files and Hugging Face directories to a config, lazy weights and a tokenizer."""
from reprise.loader.default import LoadedModel, default_model_path, load_model
from reprise.loader.errors import LoadError
from reprise.loader.tokenizer import Tokenizer

__all__ = ["LoadError", "LoadedModel", "Tokenizer", "default_model_path", "load_model"]
