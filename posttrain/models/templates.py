"""Chat templates: the built-in `.jinja` files (`{% generation %}` markers, `enable_thinking`) and custom ones.

`chatml_vl` is one template for every vision-language processor family; only the text that stands for one image
differs (`IMAGE_PLACEHOLDERS`), and the processor expands it to the image's tokens.
"""

import logging
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)

CHAT_TEMPLATES = Path(__file__).resolve().parent.parent / "chat_templates"
# How each processor family writes one image in the text, before the processor expands it to the image's tokens.
IMAGE_PLACEHOLDERS = {
    "LlavaProcessor": "<image>",
    "Qwen2VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Qwen2_5_VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Ernie4_5_VLMoeProcessor": "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
}


# The token each built-in template ends a reply with. The tokenizer's EOS becomes it (`end_turns_with`): generation
# (evaluation, pair sampling, GRPO's rollouts) stops at the end of a reply, and TRL ends plain-text replies with it. A
# base model whose EOS is another token (ERNIE's </s> beside <|end_of_sentence|>, a Qwen base model's <|endoftext|>
# beside <|im_end|>) would otherwise write past the end of its turn.
END_OF_TURN = {"chatml": "<|im_end|>", "chatml_vl": "<|im_end|>", "ernie4_5": "<|end_of_sentence|>"}


def end_turns_with(tokenizer, chat_template: str | None) -> None:
    """Make a built-in `chat_template`'s end-of-reply token the tokenizer's EOS, when the vocabulary has it."""
    token = END_OF_TURN.get(chat_template or "")
    if token and tokenizer.eos_token != token and token in tokenizer.get_vocab():
        logger.info(f"chat template {chat_template} ends a reply with {token}: EOS set to it (was {tokenizer.eos_token})")
        tokenizer.eos_token = token


def chat_template_text(name_or_path: str) -> str:
    """A built-in template name (`chatml`, `ernie4_5`) or a path to a .jinja file."""
    builtin = CHAT_TEMPLATES / f"{name_or_path}.jinja"
    if builtin.is_file():
        return builtin.read_text()
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text()
    choices = ", ".join(p.stem for p in sorted(CHAT_TEMPLATES.glob("*.jinja")))
    raise UserError(f"chat template '{name_or_path}' is neither a built-in ({choices}) nor a file")


def vl_chat_template(processor) -> str:
    """`chatml_vl.jinja` with the processor's own image placeholder.

    The template reads `image_placeholder` and falls back to LLaVA's `<image>`; a saved chat template must work
    without extra arguments to `apply_chat_template` (TRL's collators pass none), so the value is set by one `{% set %}`
    line put in front of the file, not passed at render time."""
    name = type(processor).__name__
    if name not in IMAGE_PLACEHOLDERS:
        raise UserError(f"chat template 'chatml_vl' does not know how {name} writes an image; use the model's own "
                        f"template (chat_template: null) or a .jinja file. Known: {', '.join(IMAGE_PLACEHOLDERS)}")
    return f"{{%- set image_placeholder = '{IMAGE_PLACEHOLDERS[name]}' -%}}\n" + chat_template_text("chatml_vl")
