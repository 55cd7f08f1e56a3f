"""Reasoning gates: reasoning a template would drop from a reply (SFT rows and both sides of a pair), the thinking
modes a template renders, non-thinking rows that reason anyway."""

import re

from ..data import REASONING_FIELDS, message_reasoning, preference_texts, reply_text, template_kwargs
from ..errors import UserError, row_name
from ..models.vision import text_tokenizer


def check_row_reasoning(dataset, name: str) -> None:
    """A column of reasoning text beside the replies (`reasoning_content`, `reasoning`, or `thinking` holding text, not
    the thinking mode) is no TRL format: TRL and the chat templates read a reply's reasoning from its assistant
    message, and the stages drop the columns they do not know, so the reasoning would leave training without a word."""
    from datasets import Value

    for column in REASONING_FIELDS:
        feature = dataset.features.get(column)
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            raise UserError(f"pre-flight: {name}: the `{column}` column holds reasoning text beside the replies, which "
                            "TRL does not read, so it would be dropped from training. Put each reply's reasoning in "
                            "the reply: as `reasoning_content` of its assistant message ({\"role\": \"assistant\", "
                            "\"content\": ..., \"reasoning_content\": ...}) or as a leading <think>...</think> block "
                            "of its text; a row's `thinking` column is its thinking mode (true/false)")


def reply_reasoning(message) -> str | None:
    """An assistant message's reasoning field (`data.message_reasoning`), when it says something."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return None
    reasoning = message_reasoning(message)
    return reasoning if isinstance(reasoning, str) and reasoning.strip() else None


def check_reasoning(tokenizer, dataset, name: str) -> None:
    """Replies with a reasoning field (`reasoning_content`, TRL's and OpenAI's form, or its aliases `thinking` and
    `reasoning`) must keep their reasoning: posttrain's templates, like many, render `content` only, so the reasoning
    would be dropped from training without a word. Checked on the first such row, rendered as TRL renders it."""
    if "messages" not in dataset.column_names:
        return
    for index, messages in enumerate(dataset["messages"]):
        reasoning = next(filter(None, map(reply_reasoning, messages or [])), None)
        if reasoning is None:
            continue
        row = dataset[index]
        text = tokenizer.apply_chat_template(messages, tokenize=False, **(row.get("chat_template_kwargs") or {}))
        if reasoning.strip() not in text:
            raise UserError(f"pre-flight: {name} {row_name(index)}: the reply's reasoning_content is not in the text "
                            "the chat template renders, so it would be dropped from training. Convert the file with "
                            "`posttrain data build_sft_set --sources FILE --output_dir DIR` (it writes the reasoning "
                            "as a <think> block and sets the row's thinking mode), or use a template that renders it")
        return


def _side_reasoning(reply) -> str | None:
    """A preference reply's reasoning: its last message's reasoning field, else the text of a leading <think> block."""
    if isinstance(reply, list):
        message = reply[-1] if reply and isinstance(reply[-1], dict) else {}
        reasoning = reply_reasoning(message)
        if reasoning:
            return reasoning
        reply = message.get("content")
    block = re.match(r"\s*<think>(.*?)</think>", reply, re.S) if isinstance(reply, str) else None
    return block.group(1).strip() or None if block else None


def check_pair_reasoning(tokenizer, dataset, name: str) -> None:
    """A pair's replies keep their reasoning in what DPO compares (`data.preference_texts`, TRL's tokenization): as a
    field (`reasoning_content`, ...) under a template that renders `content` only, or as a <think> block under a
    template that cuts it out of replies (DeepSeek-R1-Distill's own), DPO would prefer one answer over the other
    without the reasoning that led to it. Checked on the first pair with reasoning."""
    if not {"prompt", "chosen", "rejected"} <= set(dataset.column_names):
        return  # check_preference_pairs names the missing columns
    eos = text_tokenizer(tokenizer).eos_token
    for index, row in enumerate(dataset):
        if row["prompt"] is None or stripped_reply(row["chosen"]) is None or stripped_reply(row["rejected"]) is None:
            continue  # not a pair: check_preference_pairs names it (or skips it, skip_bad_rows)
        reasoning = [_side_reasoning(row[key]) for key in ("chosen", "rejected")]
        if not any(reasoning):
            continue
        texts = preference_texts(tokenizer, row, eos)[1:]
        for key, said, text in zip(("chosen", "rejected"), reasoning, texts):
            if said and said.strip() not in text:
                raise UserError(f"pre-flight: {name} {row_name(index)}: the {key} reply's reasoning is not in the "
                                "text the chat template renders for it, so DPO would compare the replies without it. "
                                "Convert the file with `posttrain data build_preference_set --sources FILE "
                                "--output_dir DIR` (it writes the reasoning as a <think> block), or set "
                                "base.chat_template to a template that renders it (chatml, ernie4_5, or a .jinja file)")
        return


def check_thinking_modes(tokenizer, dataset, name: str) -> None:
    """Rows of both thinking modes need a chat template that renders them differently: one that ignores
    `enable_thinking` (Qwen2.5-VL's own, most templates without a thinking switch) gives both the same prompt, so the
    model would learn to think or not at random and could not be asked for either mode."""
    if "messages" not in dataset.column_names or "chat_template_kwargs" not in dataset.column_names:
        return
    modes = {(kwargs or {}).get("enable_thinking") for kwargs in dataset["chat_template_kwargs"]}
    if not {True, False} <= modes:
        return
    prompt = (dataset[0]["messages"] or [])[:-1]
    on, off = (tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=mode)
               for mode in (True, False))
    if on == off:
        raise UserError(f"pre-flight: {name} has thinking and non-thinking rows, but the chat template renders both "
                        "modes the same (it ignores enable_thinking), so the model cannot tell which one a prompt asks "
                        "for. Set base.chat_template to one that takes enable_thinking (chatml, ernie4_5; chatml_vl "
                        "for a vision-language model), or build the data in one mode")


def non_thinking_reasoning(row: dict, replies: dict) -> str | None:
    """Why a row in non-thinking mode (`enable_thinking: false`, or a false `thinking` column) has a reply with
    reasoning (`_side_reasoning`: a reasoning field, or a leading <think> block with text in it), or None. posttrain's
    templates prefill the empty think block only before a reply that opens none, and DPO's prompt is cut where the
    renderings part (after `<think>`): the row would train thinking under the non-thinking label. `replies` maps a
    name for the error to a reply (a text or a list of messages)."""
    if template_kwargs(row.get("thinking"), row.get("chat_template_kwargs")).get("enable_thinking") is not False:
        return None
    said = next((key for key, reply in replies.items() if _side_reasoning(reply)), None)
    return said and (f"the row is non-thinking (enable_thinking: false) but its {said} reply has reasoning (a <think> "
                     "block or reasoning field), which the template then trains as a thinking reply; expected a "
                     "reply without reasoning in non-thinking mode: remove the reasoning or mark the row thinking "
                     "(`thinking: true`)")


def check_non_thinking_replies(dataset, name: str) -> None:
    """SFT rows: `non_thinking_reasoning` on each assistant turn (or the completion), an error naming the row."""
    for index, row in enumerate(dataset):
        turns = row.get("messages") or row.get("completion") or []
        replies = ({f"messages[{i}]": [m] for i, m in enumerate(turns)
                    if isinstance(m, dict) and m.get("role") == "assistant"}
                   if isinstance(turns, list) else {"completion": turns})
        if reason := non_thinking_reasoning(row, replies):
            raise UserError(f"pre-flight: {name} {row_name(index)}: {reason}")


def stripped_reply(completion) -> str | None:
    """A reply's text without surrounding whitespace; None for one that is neither text nor messages."""
    try:
        return reply_text(completion).strip()
    except TypeError:
        return None
