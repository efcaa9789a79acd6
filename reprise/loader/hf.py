"""Hugging Face model directories: config.json, *.safetensors (sharded or not), tokenizer files."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import tokenizers
import torch
from safetensors import safe_open
from tqdm import tqdm

from reprise.loader.errors import LoadError
from reprise.models.config import LAYER_KINDS, ModelConfig
from reprise.models.layers.mlp import ACTIVATIONS

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Gemma3ForCausalLM": "gemma3",
    # vision-language wrappers (every Qwen3.5 release, Gemma 3 4B and up): their text decoder is served
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Gemma3ForConditionalGeneration": "gemma3",
}
# What transformers' Gemma3TextConfig assumes for keys a config.json leaves out: Gemma 3 4B+ files were saved as
# a diff against these, so their text_config lists only a few keys (hidden_size, num_hidden_layers, ...).
_TEXT_DEFAULTS = {
    "gemma3": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                   sliding_window=4096, tie_word_embeddings=True),
}
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_SKIPPED = ("rotary_emb.inv_freq",)      # buffers some old checkpoints saved; recomputed by the model
# A vision-language checkpoint's text decoder under the names of the text-only model. transformers 5 writes
# model.language_model.*; older Gemma 3 files (and transformers' own save of Gemma 3) say language_model.model.*
_RENAMED = (("model.language_model.", "model."), ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."))
# Vision towers, their projectors and Qwen3.5's multi-token-prediction head: reprise serves text only and
# decodes one token per step, so these weights are left in the file.
_UNUSED = ("model.visual.", "model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
           "multi_modal_projector.", "mtp.")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise LoadError(f"cannot read {path}: {' '.join(str(error).split())}") from None


def hf_config(path: str) -> ModelConfig:
    """ModelConfig from config.json, plus eos ids from generation_config.json (an int or a list)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise LoadError(f"no config.json in model directory {path}")
    raw = _read_json(config_path)
    arch = _architecture(raw, path)
    text = _text_config(raw, arch)
    _check_supported_options(text, arch, config_path)
    generation_path = os.path.join(path, "generation_config.json")
    generation = _read_json(generation_path) if os.path.isfile(generation_path) else {}
    try:
        num_heads = text["num_attention_heads"]
        return ModelConfig(
            architecture=arch,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=text.get("num_key_value_heads") or num_heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // num_heads,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=text.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            sliding_window=text.get("sliding_window") if arch in ("mistral", "gemma3") else None,
            bos_token_id=next((i for i in (raw.get("bos_token_id"), text.get("bos_token_id"),
                                            generation.get("bos_token_id")) if i is not None), None),
            eos_token_ids=_ids(raw.get("eos_token_id"), text.get("eos_token_id"), generation.get("eos_token_id")),
            name=os.path.basename(os.path.normpath(path)),
            **_family_fields(text, arch),
        )
    except KeyError as error:
        raise LoadError(f"{config_path} has no {error.args[0]!r}") from None


def hf_weights(path: str, config: ModelConfig) -> Callable[..., Iterator[tuple[str, torch.Tensor]]]:
    """A function yielding (HF name, float32 tensor) from every safetensors file, one tensor at a time.

    The files' headers are read now, so a missing or unreadable shard fails at load time. A vision-language
    checkpoint's text decoder comes under the text-only model's names (see `_text_weight_name`).
    """
    names = []
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise LoadError(f"corrupt safetensors file {file}: {' '.join(str(error).split())}") from None
        named = ((key, _text_weight_name(key, config.tie_word_embeddings)) for key in keys)
        names += [(file, key, name) for key, name in named if name is not None]

    def weights(native: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """`native` is accepted for symmetry with GGUF: safetensors weights are always float."""
        with ExitStack() as stack:
            handles = {}
            for file, key, name in tqdm(names, desc="loading weights", unit="tensor"):
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                yield name, handles[file].get_tensor(key).float()
    return weights


def hf_tokenizer_parts(path: str) -> tuple[tokenizers.Tokenizer, dict[str, str], str | None]:
    """(tokenizer.json, special token texts, chat template) of a model directory.

    The template comes from chat_template.jinja when present (newer transformers saves it
    there), else from tokenizer_config.json ("default" when it holds several).
    """
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise LoadError(f"no tokenizer.json in model directory {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(file)
    except Exception as error:  # tokenizers raises a plain Exception on bad JSON
        raise LoadError(f"cannot read {file}: {' '.join(str(error).split())}") from None
    config = _optional_json(os.path.join(path, "tokenizer_config.json"))
    legacy = _optional_json(os.path.join(path, "special_tokens_map.json"))
    special_tokens = {name: _token_text(config.get(name, legacy.get(name))) for name in _SPECIAL_TOKEN_NAMES}
    return backend, special_tokens, _chat_template(path, config)


def _text_config(raw: dict, arch: str) -> dict:
    """The text decoder's settings over the family's defaults: a vision-language config's `text_config`, else
    the whole file. As in transformers, the wrapper's top level decides whether the embeddings are tied."""
    defaults = _TEXT_DEFAULTS.get(arch, {})
    text = {**defaults, **(raw.get("text_config") or raw)}
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))
    return text


def _text_weight_name(key: str, tied: bool) -> str | None:
    """The text-only model's name for a stored weight; None for one it does not use. Names it does not know
    pass through, so the model rejects them."""
    for old, new in _RENAMED:
        if key.startswith(old):
            key = new + key.removeprefix(old)
            break
    if key.startswith(_UNUSED) or key.endswith(_SKIPPED) or (tied and key == "lm_head.weight"):
        return None
    return key


def _architecture(raw: dict, path: str) -> str:
    names = raw.get("architectures") or []
    if names and names[0] in ARCHITECTURES:
        return ARCHITECTURES[names[0]]
    if not names and raw.get("model_type") in ARCHITECTURES.values():
        return raw["model_type"]
    found = names[0] if names else raw.get("model_type")
    raise LoadError(f"unsupported architecture {found!r} in {path} "
                    f"(supported: {', '.join(dict.fromkeys(ARCHITECTURES.values()))})")


def _check_supported_options(raw: dict, arch: str, config_path: str) -> None:
    """Options of these families that change the weights or the attention pattern, which we lack."""
    unsupported = [f"{key}=true" for key in ("mlp_bias", "use_sliding_window", "use_bidirectional_attention")
                   if raw.get(key)]
    if arch != "qwen2" and raw.get("attention_bias"):
        unsupported.append("attention_bias=true")
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    if activation not in ACTIVATIONS:
        unsupported.append(f"hidden_act={activation}")
    local_rope = ((raw.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_type", "default")
    if arch == "gemma3" and local_rope != "default":
        unsupported.append(f"rope_type={local_rope} on sliding_attention layers")
    layer_types = set(raw.get("layer_types") or ()) - set(LAYER_KINDS)
    if layer_types:
        unsupported.append(f"layer type {sorted(layer_types)[0]}")
    if unsupported:
        raise LoadError(f"unsupported option {unsupported[0]} in {config_path}")


def _family_fields(raw: dict, arch: str) -> dict:
    """ModelConfig fields whose reading differs by family: RoPE, activation, layer types and the rest."""
    if arch == "gemma3":
        return dict(**_gemma3_rope(raw), hidden_act=raw.get("hidden_activation") or "gelu_pytorch_tanh",
                    layer_types=_layer_types(raw, "sliding_window_pattern", 6, "sliding_attention"),
                    query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
                    final_logit_softcapping=raw.get("final_logit_softcapping"))
    theta, scaling = _rope(raw)
    fields = dict(rope_theta=theta, rope_scaling=scaling, hidden_act=raw.get("hidden_act") or "silu")
    if arch == "qwen3_5":
        params = raw.get("rope_parameters") or {}
        fields.update(
            layer_types=_layer_types(raw, "full_attention_interval", 4, "linear_attention"),
            partial_rotary_factor=float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))),
            linear_conv_kernel_dim=raw.get("linear_conv_kernel_dim", 4),
            linear_num_key_heads=raw["linear_num_key_heads"], linear_num_value_heads=raw["linear_num_value_heads"],
            linear_key_head_dim=raw["linear_key_head_dim"], linear_value_head_dim=raw["linear_value_head_dim"])
    return fields


def _layer_types(raw: dict, pattern_key: str, default_period: int, between: str) -> tuple[str, ...]:
    """`layer_types`, or for configs without it the family's period: every period-th layer is
    full attention, the layers between are `between`."""
    if raw.get("layer_types"):
        return tuple(raw["layer_types"])
    period = raw.get(pattern_key) or default_period
    return tuple("full_attention" if (i + 1) % period == 0 else between for i in range(raw["num_hidden_layers"]))


def _rope(raw: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in HF form or None) from either config layout.

    transformers 5 writes one `rope_parameters` dict holding rope_theta; older configs have a
    top-level rope_theta and a `rope_scaling` dict that may say "type" for "rope_type". Keys that
    only shape positions for images (Qwen3.5's mrope_*) or the rotary share are not scaling.
    """
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", default_theta)))
    for key in ("partial_rotary_factor", "mrope_section", "mrope_interleaved"):
        params.pop(key, None)
    legacy_type = params.pop("type", None)
    params.setdefault("rope_type", legacy_type or "default")
    return theta, None if params["rope_type"] == "default" else params


def _gemma3_rope(raw: dict) -> dict:
    """Gemma 3: full layers use the global base (and any scaling), sliding layers a local base.
    transformers 5 keeps one rope_parameters dict per layer type; older configs say
    rope_theta / rope_scaling / rope_local_base_freq."""
    per_type = raw.get("rope_parameters") or {}
    if "full_attention" in per_type:
        theta, scaling = _rope({"rope_parameters": per_type["full_attention"]}, 1_000_000.0)
        local_theta, _ = _rope({"rope_parameters": per_type.get("sliding_attention")}, 10_000.0)
    else:
        theta, scaling = _rope(raw, 1_000_000.0)
        local_theta = float(raw.get("rope_local_base_freq", 10_000.0))
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_base_freq=local_theta)


def _ids(*values) -> tuple[int, ...]:
    ids = []
    for value in values:
        ids += [value] if isinstance(value, int) else list(value or ())
    return tuple(dict.fromkeys(ids))


def _optional_json(path: str) -> dict:
    return _read_json(path) if os.path.isfile(path) else {}


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as file:
            return file.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default", next(iter(named.values()), None))
    return template


def _safetensors_files(path: str) -> list[str]:
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        shards = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
        files = [os.path.join(path, shard) for shard in shards]
        for file in files:
            if not os.path.isfile(file):
                raise LoadError(f"shard {file} listed in {index_path} is missing")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise LoadError(f"no *.safetensors weights in model directory {path}")
    return files
