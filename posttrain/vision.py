"""Vision-language models: building test VLMs, loading processors, LoRA on the language tower, images in datasets.

Modality follows from the model folder and the data, as in TRL: a `config.json` with a `vision_config` is a VLM (loaded
with `AutoModelForImageTextToText` and its processor), and a dataset with an `images` column is vision data. The stages
stay the same TRL trainers; this module holds what only VLMs need:

- models: `tiny:llava`, `tiny:qwen2_vl`, `tiny:qwen2_5_vl`, `tiny:ernie4_5_vl` (random weights, the tiny tokenizer,
  32-64 px images, a few image tokens; ERNIE-4.5-VL's MoE layer has text and vision experts) and
  `llava:<causal LM>`: LLaVA around any causal LM folder with a small fresh vision tower + projector (the default
  vision recipe puts one around SmolLM2-135M);
- processors: without torchvision, processors that also handle video cannot be built by `AutoProcessor`; they are
  loaded image-only (same class name, no video processor), which is all image training needs;
- LoRA: on the language tower only; the vision tower and projector stay frozen unless the recipe lists them in
  `lora_modules_to_save` (then they are trained in full and saved in the adapter);
- data: `images` columns of file paths are decoded to PIL images; SFT rows become prompt/completion so TRL's vision
  collator renders each row in its own thinking mode (it ignores `chat_template_kwargs` for `messages` rows).

ERNIE-4.5-VL's per-token expert routing, which TRL's collators and GRPO do not lay out, is in `posttrain.moe_routing`.
"""

import json
from pathlib import Path

from .errors import UserError

CHAT_TEMPLATE = Path(__file__).parent / "chat_templates" / "chatml_vl.jinja"
# How each processor family writes one image in the text, before the processor expands it to the image's tokens.
IMAGE_PLACEHOLDERS = {
    "LlavaProcessor": "<image>",
    "Qwen2VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Qwen2_5_VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Ernie4_5_VLMoeProcessor": "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
}
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# ERNIE-4.5-VL's processor reads these as named tokenizer attributes (`tokenizer.image_token`, ...)
ERNIE_VL_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                   "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                   "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
TINY_VLMS = ("llava", "qwen2_vl", "qwen2_5_vl", "ernie4_5_vl")
_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------------
def is_vision_model(path: str | Path) -> bool:
    """Whether the model folder holds a vision-language model (its config has a `vision_config`)."""
    config = Path(path) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def is_processor(processing_class) -> bool:
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def text_tokenizer(processing_class):
    """The tokenizer inside a processor, or the tokenizer itself (EOS, padding and decoding live there)."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def has_images(dataset) -> bool:
    return dataset is not None and "images" in (dataset.column_names or [])


# ----------------------------------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------------------------------
def vl_chat_template(processor) -> str:
    """`chatml_vl.jinja` with the processor's own image placeholder."""
    name = type(processor).__name__
    if name not in IMAGE_PLACEHOLDERS:
        raise UserError(f"chat template 'chatml_vl' does not know how {name} writes an image; use the model's own "
                        f"template (chat_template: null) or a .jinja file. Known: {', '.join(IMAGE_PLACEHOLDERS)}")
    text = CHAT_TEMPLATE.read_text()
    return text.replace("{%- set image_placeholder = '<image>' -%}",
                        f"{{%- set image_placeholder = '{IMAGE_PLACEHOLDERS[name]}' -%}}", 1)


def _processor_class(path: Path):
    import transformers

    config = path / "processor_config.json"
    name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    return getattr(transformers, name, None) if name else None


def _image_only(processor_cls):
    """`processor_cls` without its video processor: its base class checks every attribute against a class that only
    exists with torchvision, but images never touch the video processor. Same class name, so saved folders stay
    loadable by `AutoProcessor` where torchvision is installed."""
    from transformers import ProcessorMixin

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):  # ERNIE-4.5-VL's own also copies its video processor's font
        return ProcessorMixin.save_pretrained(self, save_directory, **kwargs)

    return type(processor_cls.__name__, (processor_cls,),
                {"__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__})


def load_processor(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """A VLM's processor, image-only without torchvision, with the recipe's chat template and a pad token != EOS."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = Path(path)
    processor_cls = _processor_class(path)
    needs_video = processor_cls is not None and "video_processor" in processor_cls.get_attributes()
    if needs_video and not is_torchvision_available():
        processor = _image_only(processor_cls).from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template == "chatml_vl":
        processor.chat_template = vl_chat_template(processor)
    elif chat_template:
        from .models import chat_template_text

        processor.chat_template = chat_template_text(chat_template)
    processor.tokenizer.chat_template = processor.chat_template
    return processor


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
    text = dict(_TINY_TEXT, vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
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
    return config, _image_only(processor_cls)(image_processor=image_processor, tokenizer=tokenizer)


def _ernie_vl_parts(special: dict):
    """ERNIE-4.5-VL: a dense first layer, then a MoE layer with 4 text and 4 vision experts (top-2) and 1 shared."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    from .models import TINY_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER, extra_special_tokens=ERNIE_VL_TOKENS)
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in ERNIE_VL_TOKENS.items()}
    # mrope_section: (height, width, time) halves of the rotary dimensions, height == width
    text = dict(_TINY_TEXT, vocab_size=len(tokenizer), moe_intermediate_size=[32, 32], moe_k=2, moe_num_experts=4,
                moe_num_shared_experts=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [3, 3, 2]}, **special)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2)
    config = transformers.Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # 56 x 56 pixels, as for Qwen-VL: 4 image tokens between the image start and end tokens
    image_processor = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    processor = _image_only(transformers.Ernie4_5_VLMoeProcessor)(image_processor=image_processor, tokenizer=tokenizer)
    return config, processor


def build_tiny_vlm(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight VLM (`TINY_VLMS`) with the tiny tokenizer and a processor using `chatml_vl`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, LlamaConfig

    from .models import TINY_TOKENIZER, save_atomic

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if arch == "llava":
        text = LlamaConfig(**_TINY_TEXT, head_dim=16, vocab_size=len(tokenizer), **special)
        config, processor = llava_parts(text, tokenizer, image_size=32, patch_size=8, vision_hidden=32,
                                        vision_layers=1)
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        config, processor = _qwen_vl_parts(arch, tokenizer, special)
    elif arch == "ernie4_5_vl":
        config, processor = _ernie_vl_parts(special)
    else:
        raise UserError(f"unknown tiny vision architecture 'tiny:{arch}'; choose one of: {', '.join(TINY_VLMS)}")
    processor.chat_template = vl_chat_template(processor)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    return save_atomic(out_dir, model, processor)


# 64 px images in 4 patches of 32 px = 4 image tokens: easy-VQA's one-shape images need no more, and every token
# costs a pass through the 135M language model
LLAVA_VISION = dict(image_size=64, patch_size=32, vision_hidden=128, vision_layers=2)


def build_llava(language_model: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """LLaVA around the causal LM folder `language_model`: its weights and tokenizer (plus an `<image>` token), and a
    fresh small vision tower and projector (`LLAVA_VISION`), which the recipe trains via `lora_modules_to_save`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from .models import save_atomic

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

    return save_atomic(out_dir, model, processor)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA on the language tower
# ----------------------------------------------------------------------------------------------------------------------
def vision_modules(model) -> list[str]:
    """Names of the non-language parts of a VLM (vision tower, projector/merger): the children of its base model
    other than `language_model`, e.g. `vision_tower` and `multi_modal_projector` (LLaVA) or `visual` (Qwen2-VL)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    children = dict(base.model.named_children())
    if "language_model" not in children:
        raise UserError(f"{type(base).__name__}: no `model.language_model`; cannot tell the language tower from the "
                        "vision tower, so LoRA cannot be restricted to it")
    return [name for name in children if name != "language_model"]


def language_only_lora(peft_config, model):
    """Keep LoRA out of the vision tower and projector (PEFT's `all-linear` would take them too); modules listed in
    `modules_to_save` are trained in full instead."""
    names = "|".join(vision_modules(model))
    peft_config.exclude_modules = rf"(.*\.)?({names})(\..*)?"
    return peft_config


def freeze_vision(trainer, trainable: list[str] | None) -> list[str]:
    """Keep the modules a continued adapter brought back in full (its `modules_to_save`: the vision tower and
    projector trained in SFT) unchanged in this stage, unless the stage lists them in `trainable`; returns their names.

    `requires_grad_(False)` does not hold: PEFT makes an adapter's modules_to_save trainable whenever it activates the
    adapter, which TRL does after every reference pass, and with gradient checkpointing a flip between a forward and
    its recomputation is an error. So they stay out of the optimizer (built here, before training) and their gradients
    are zeroed, so that they do not count in gradient clipping either."""
    import torch

    trainable = trainable or []
    frozen = [(name, param) for name, param in trainer.model.named_parameters()
              if ".modules_to_save.default." in name
              and not any(f".{module}.modules_to_save." in f".{name}" for module in trainable)]
    if not frozen:
        return []
    for _, param in frozen:
        param.requires_grad_(False)
    trainer.create_optimizer()
    for _, param in frozen:
        param.requires_grad_(True)
        param.register_hook(torch.zeros_like)
    return sorted({name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for name, _ in frozen})


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def decode_images(dataset):
    """The `images` column as PIL images: file paths (data_prep's `build_sft_set`) are cast to `datasets.Image`."""
    from datasets import Image, List

    if not has_images(dataset) or isinstance(dataset.features["images"].feature, Image):
        return dataset
    return dataset.cast_column("images", List(Image()))


def as_rows(dataset) -> list[dict]:
    """The dataset as a list of rows, images decoded to PIL (`to_list()` would give their raw bytes)."""
    return list(decode_images(dataset)) if has_images(dataset) else dataset.to_list()


def sft_rows_to_prompt_completion(dataset):
    """`messages` rows as prompt (every turn before the last reply) + completion (the last reply).

    TRL's vision collator renders `messages` batches with one set of template arguments, so a per-row thinking mode
    would be lost; for prompt-completion rows it applies each row's `chat_template_kwargs`, and the loss is on the
    completion only (as assistant-only loss would be for a single reply). Earlier replies of a multi-turn row are
    context, not trained."""
    if "messages" not in dataset.column_names:
        return dataset

    def split(row):
        messages = row["messages"]
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return dataset.map(split, remove_columns=["messages"])


def message_text(content) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content or ""


# ----------------------------------------------------------------------------------------------------------------------
# Generation and scoring with images (evaluation, on-policy pairs)
# ----------------------------------------------------------------------------------------------------------------------
def encode(processor, prompts: list[str], images: list, device):
    """Rendered prompts with their images, left-padded for generation: input ids with each image expanded to its
    tokens, plus the processor's image tensors (`pixel_values`, `image_grid_thw`, `mm_token_type_ids`...)."""
    processor.tokenizer.padding_side = "left"
    flat = [list(row or []) for row in images]
    batch = processor(text=prompts, images=flat if any(flat) else None, padding=True, return_tensors="pt",
                      add_special_tokens=False)
    return batch.to(device)


def completion_layout(processor, prompts: list[str], images: list, completions: list[str], device) -> dict:
    """Rendered prompts with their images + completions, as model inputs with a `completion_mask` (for teacher-forced
    scoring). Laid out as TRL's vision preference collator does: processed prompts (left-padded) + tokenized
    completions (right-padded), flushed left, per-token type ids extended with zeros over the completion."""
    import torch
    from trl.trainer.utils import flush_left

    batch = encode(processor, prompts, images, device)
    processor.tokenizer.padding_side = "right"
    reply = processor.tokenizer(completions, padding=True, return_tensors="pt", add_special_tokens=False).to(device)
    input_ids = torch.cat([batch.pop("input_ids"), reply["input_ids"]], dim=1)
    prompt_mask = batch.pop("attention_mask")
    attention_mask = torch.cat([prompt_mask, reply["attention_mask"]], dim=1)
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), reply["attention_mask"]], dim=1)
    typed = [k for k in ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids") if k in batch]
    for key in typed:
        batch[key] = torch.cat([batch[key], torch.zeros_like(reply["input_ids"])], dim=1)
    attention_mask, input_ids, completion_mask, *types = flush_left(
        attention_mask, input_ids, completion_mask, *[batch[k] for k in typed])
    batch.update(zip(typed, types))
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
