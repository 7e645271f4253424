"""Adapters that change what a loaded model draws without retraining it: LoRA weights and
textual-inversion embeddings."""

from .embeddings import (
    Embedding, load_embeddings, loaded_embeddings, read_embeddings, ti_hashes, unload_embeddings, used_embeddings,
)
from .lora import (
    AppliedLora, Lora, LoraTag, apply_lora, apply_loras, apply_prompt_adapters, applied_loras, find_lora,
    lora_hashes, lora_request_tags, parse_lora_option, parse_lora_tags, prompt_lora_tags, read_lora, set_prompt_loras,
    unload_loras,
)

__all__ = [
    "AppliedLora", "Embedding", "Lora", "LoraTag", "apply_lora", "apply_loras", "apply_prompt_adapters",
    "applied_loras", "find_lora", "load_embeddings", "loaded_embeddings", "lora_hashes", "lora_request_tags",
    "parse_lora_option", "parse_lora_tags", "prompt_lora_tags", "read_embeddings", "read_lora", "set_prompt_loras",
    "ti_hashes", "unload_embeddings", "unload_loras", "used_embeddings",
]
