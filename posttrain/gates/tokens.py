"""The special-token text gate: turns that write a conversation's control tokens (end of turn, BOS/EOS, padding, image
placeholders) as plain text, which the tokenizer would turn into the tokens themselves."""

import re

from ..errors import UserError, row_name
from ..models.templates import IMAGE_PLACEHOLDERS
from ..models.vision import has_images, text_tokenizer
from .images import check_image_slots

# Special tokens that posttrain's data writes into turns on purpose (`build_sft_set`'s <think> blocks): where a
# vocabulary makes them special, the text is meant to become the token
MEANT_AS_TOKENS = {"<think>", "</think>"}


CONVERSATION_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


def check_special_token_text(tokenizer, dataset, name: str, model=None, images: bool = False) -> None:
    """No turn of a conversation writes a special token of the vocabulary as text. The tokenizer reads such text as
    the token itself (transformers' default, `split_special_tokens=False`), so a scraped reply that explains chat
    templates ("each turn ends with <|im_end|>") would teach the model to end its turn mid-reply, and a user turn
    holding "<|im_end|>\n<|im_start|>assistant\n..." puts a reply nobody wrote into the prompt. The chat template
    writes the special tokens of a conversation; its turns are text. Plain-text rows (`text`, text prompts) are left
    alone: those may be rendered with a template already. One regular expression over the turns' strings.

    Only the tokens that shape a conversation count (`control_tokens`): SmolLM2's vocabulary also makes `<filename>`
    special, which an instruction ("replace <filename> with your file") may write and which ends no turn. With the
    `model`, its own end-of-sequence tokens count too.

    Rows with images (an `images` column, or `images=True`) may write an image placeholder (`image_tokens`): there it
    is an image's slot, which `check_image_slots` counts and names; their other control tokens count as in text rows."""
    tokens = control_tokens(tokenizer, model) - MEANT_AS_TOKENS
    if has_images(dataset) or images:
        tokens -= image_tokens(tokenizer)
    if not tokens:
        return
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    found = {}  # row -> (column, turn, role, token): every such row is counted, the first one named
    for column in (c for c in CONVERSATION_COLUMNS if c in dataset.column_names):
        for index, turns in enumerate(dataset[column]):
            for turn, message in enumerate(turns if isinstance(turns, list) and index not in found else [], 1):
                match = next(filter(None, map(pattern.search, _strings(message))), None)
                if match and index not in found:
                    role = message.get("role") if isinstance(message, dict) else None
                    found[index] = (column, turn, role, match.group())
    if found:
        index = min(found)
        column, turn, role, token = found[index]
        raise UserError(f"pre-flight: {name} {row_name(index)}: \"{column}\" turn {turn} ({role}) has the text "
                        f"{token!r}, which the tokenizer reads as its special token, not as text ({len(found)} of "
                        f"{len(dataset)} rows have such text): the model would learn to write that token (an "
                        "end-of-turn one ends the reply there), or read a turn the template did not write. Remove or "
                        "respell it in the data (a space inside it keeps it text), or drop those rows")


def check_turn_text(tokenizer, dataset, name: str, model=None) -> None:
    """What a set's turns write as text: literal image markers first where the rows have images (`check_image_slots`
    names them, and `check_special_token_text` leaves image placeholders to it), then special tokens."""
    if has_images(dataset):
        check_image_slots(dataset, name)
    check_special_token_text(tokenizer, dataset, name, model)


def control_tokens(tokenizer, model=None) -> set[str]:
    """The special tokens that shape a conversation: those the chat template writes, BOS, EOS, padding, and the
    `model`'s own end-of-sequence tokens. The last are not the tokenizer's when a built-in template made its
    end-of-reply token the EOS (`templates.end_turns_with`: ERNIE's `</s>` gave way to `<|end_of_sentence|>`), yet the
    model still stops on them, and so does its export (`export.stop_at_reply_end`)."""
    text = text_tokenizer(tokenizer)
    if text is None:  # nothing tokenizes the text: no token to mistake it for
        return set()
    template = getattr(tokenizer, "chat_template", None) or text.chat_template or ""
    if isinstance(template, dict):  # several named templates
        template = "".join(template.values())
    special = {t.content for t in text.added_tokens_decoder.values() if t.special}
    marks = {text.bos_token, text.eos_token, text.pad_token}
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = getattr(config, "eos_token_id", None)
        for token_id in ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []:
            marks.add(text.convert_ids_to_tokens(token_id))
    return {t for t in special if t in template or t in marks}


def image_tokens(processor) -> set[str]:
    """The special tokens that stand for an image or video in a processor's text: its own (`image_token`, Qwen2-VL's
    `video_token`, ERNIE-VL's `image_start_token` and the like on its tokenizer) and each token of the placeholders
    `templates.IMAGE_PLACEHOLDERS` knows (Qwen2-VL's `<|vision_start|>`, LLaVA's `<image>`, which `chatml_vl` writes
    when it knows no other)."""
    named = {getattr(processor, "image_token", None), getattr(processor, "video_token", None)}
    named |= {token for key, token in text_tokenizer(processor).special_tokens_map.items()
              if isinstance(token, str) and any(word in key for word in ("image", "video", "vision"))}
    pieces = {token for placeholder in IMAGE_PLACEHOLDERS.values() for token in re.findall(r"<[^<>]+>", placeholder)}
    return (named - {None}) | pieces


def _strings(value) -> list[str]:
    """Every string inside a turn: its content (text or parts), reasoning, tool calls."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [text for item in value for text in _strings(item)] if isinstance(value, list) else []
