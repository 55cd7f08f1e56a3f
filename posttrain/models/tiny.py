"""Models built from configs, once, into the cache: tiny random-weight test models (text and vision-language) and
LLaVA around a causal LM.

Tiny models have a few layers, hidden size 64 and the 512-token tiny tokenizer (`TINY_TOKENIZER`); they are seeded,
so every build is identical. The vision ones use 32-64 px images and a few image tokens; ERNIE-4.5-VL's MoE layer has
text and vision experts. `llava:<causal LM>` puts a small fresh vision tower + projector around any causal LM folder
(the default vision recipe puts one around SmolLM2-135M).
"""

from pathlib import Path

from ..errors import UserError
from ..io import save_pretrained
from .templates import vl_chat_template
from .vision import image_only

TINY_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
TINY_ARCHS = ("llama", "qwen2", "qwen3", "ernie4_5", "ernie4_5_moe")
TINY_VLMS = ("llava", "qwen2_vl", "qwen2_5_vl", "ernie4_5_vl")
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# ERNIE-4.5-VL's processor reads these as named tokenizer attributes (`tokenizer.image_token`, ...)
ERNIE_VL_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                   "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                   "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
# The language model of every tiny model, text or vision
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def _tiny_config(arch: str, vocab_size: int, special: dict):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5Config, LlamaConfig, Qwen2Config, Qwen3Config

    builders = {
        "llama": lambda: LlamaConfig(**_TINY_COMMON, head_dim=16),
        "qwen2": lambda: Qwen2Config(**_TINY_COMMON),
        "qwen3": lambda: Qwen3Config(**_TINY_COMMON, head_dim=16),
        "ernie4_5": lambda: Ernie4_5Config(**_TINY_COMMON, head_dim=16),
        "ernie4_5_moe": lambda: Ernie4_5_MoeConfig(
            **_TINY_COMMON, moe_intermediate_size=32, moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
    }
    config = builders[arch]()
    config.vocab_size = vocab_size
    for key, value in special.items():
        setattr(config, key, value)
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Tiny VLMs and LLaVA around a causal LM
# ----------------------------------------------------------------------------------------------------------------------
def llava_parts(text_config, tokenizer, image_size: int, patch_size: int, vision_hidden: int, vision_layers: int):
    """(config, processor) of a LLaVA whose vision tower is a small CLIP ViT: (image_size / patch_size)² image tokens."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 32),
                              image_size=image_size, patch_size=patch_size)
    config = LlavaConfig(text_config=text_config, vision_config=vision,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=text_config.tie_word_embeddings)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor


def _qwen_vl_parts(arch: str, tokenizer, special: dict):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VISION_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    text = dict(_TINY_COMMON, vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                        "mrope_section": [2, 3, 3]}, **special)
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen2_vl":
        config_cls, processor_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLProcessor
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    else:
        config_cls, processor_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLProcessor
        vision.update(intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[0], window_size=56)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    # 56 x 56 pixels = 4 x 4 patches of 14 = 4 image tokens after the 2 x 2 merge, whatever the input size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    return config, image_only(processor_cls)(image_processor=image_processor, tokenizer=tokenizer)


def _ernie_vl_parts(special: dict):
    """ERNIE-4.5-VL: a dense first layer, then a MoE layer with 4 text and 4 vision experts (top-2) and 1 shared."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER, extra_special_tokens=ERNIE_VL_TOKENS)
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in ERNIE_VL_TOKENS.items()}
    # mrope_section: (height, width, time) halves of the rotary dimensions, height == width
    text = dict(_TINY_COMMON, vocab_size=len(tokenizer), moe_intermediate_size=[32, 32], moe_k=2, moe_num_experts=4,
                moe_num_shared_experts=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [3, 3, 2]}, **special)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2)
    config = transformers.Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # 56 x 56 pixels, as for Qwen-VL: 4 image tokens between the image start and end tokens
    image_processor = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    processor = image_only(transformers.Ernie4_5_VLMoeProcessor)(image_processor=image_processor, tokenizer=tokenizer)
    return config, processor


def _vlm_parts(arch: str, tokenizer, special: dict):
    """(config, processor using `chatml_vl`) of the tiny VLM `arch`."""
    from transformers import LlamaConfig

    if arch == "llava":
        text = LlamaConfig(**_TINY_COMMON, head_dim=16, vocab_size=len(tokenizer), **special)
        config, processor = llava_parts(text, tokenizer, image_size=32, patch_size=8, vision_hidden=32,
                                        vision_layers=1)
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        config, processor = _qwen_vl_parts(arch, tokenizer, special)
    else:
        config, processor = _ernie_vl_parts(special)
    processor.chat_template = vl_chat_template(processor)
    return config, processor


def build_tiny(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model of architecture `arch` (`TINY_ARCHS`: a causal LM with the tiny tokenizer;
    `TINY_VLMS`: a VLM with a processor) into `out_dir`; an `out_dir` another process built first is kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if arch not in TINY_ARCHS + TINY_VLMS:
        raise UserError(f"unknown tiny architecture 'tiny:{arch}'; choose one of: {', '.join(TINY_ARCHS + TINY_VLMS)}")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if arch in TINY_VLMS:
        config, processing_class = _vlm_parts(arch, tokenizer, special)
        auto_class = AutoModelForImageTextToText
    else:
        config, processing_class = _tiny_config(arch, len(tokenizer), special), tokenizer
        auto_class = AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto_class.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_pretrained(out_dir, model, processing_class, if_exists="keep")


# 64 px images in 4 patches of 32 px = 4 image tokens: easy-VQA's one-shape images need no more, and every token
# costs a pass through the 135M language model
LLAVA_VISION = dict(image_size=64, patch_size=32, vision_hidden=128, vision_layers=2)


def build_llava(language_model: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """LLaVA around the causal LM folder `language_model`: its weights and tokenizer (plus an `<image>` token), and a
    fresh small vision tower and projector (`LLAVA_VISION`), which the recipe trains via `lora_modules_to_save`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(language_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    lm.resize_token_embeddings(len(tokenizer))  # the new row is never read: image features replace it
    config, processor = llava_parts(lm.config, tokenizer, **LLAVA_VISION)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = lm.generation_config
    processor.chat_template = vl_chat_template(processor)

    return save_pretrained(out_dir, model, processor, if_exists="keep")
