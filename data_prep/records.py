"""The records every converter returns, built from checked messages: `sft`, `preference` and `unpaired` rows.

Shared by `formats` (TRL, ERNIEKit and rated data), `prompt_formats` (RL prompts) and `llamafactory` (ShareGPT,
Alpaca and LLaMA-Factory's preference and KTO files), so that a conversation, a prompt, a reply and a label are
checked the same way whatever file they came from.
"""

from dataclasses import dataclass
from pathlib import Path

from posttrain.data import REASONING_FIELDS, called

from .images import check_image_slots, check_images, image_markers_to_parts
from .messages import (
    RowError,
    check_messages,
    check_tool_calls,
    check_tools,
    merged_mode,
    require_list,
    require_str,
    text_of,
)

_LABELS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class Options:
    """What a converter needs besides the row: where relative image paths start, the rated-data margin, and for RL
    prompts the domain of rows without one (a build gives the source's name), a system turn and a thinking mode."""

    base_dir: Path = Path(".")
    check_images: bool = True
    min_score_margin: float = 1.0
    embedded_images: bool = False
    domain: str = "general"
    system: str | None = None
    thinking: bool | None = None


def _row_images(row: dict, opts: Options) -> list | None:
    return check_images(row.get("images", row.get("image")), opts.base_dir, opts.check_images,
                        embedded=opts.embedded_images)


def sft_record(row: dict, messages: list, thinking, opts: Options, system=None) -> dict:
    """An `sft` record; a row with a KTO desirability `label` is refused: its undesirable replies must not be trained
    on as if they were good ones (build a preference set from it instead)."""
    if desirability_label(row.get("label")) is not None:
        raise RowError("label", f"is {row['label']!r}: a KTO desirability label on a conversation",
                       "SFT rows without one (this is preference data: build_preference_set reads it as unpaired "
                       "`prompt/completion/label` rows)")
    if system is not None:
        system = require_str(system, "system", "a string", allow_empty=True)
        if system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
    images = _row_images(row, opts)
    check_image_slots([messages], images)
    messages = image_markers_to_parts(messages) if images else messages
    thinking = row_thinking(row, thinking)
    return {"messages": messages, "tools": row_tools(row), "images": images, "thinking": thinking}


def row_tools(row: dict) -> list[dict] | None:
    """The row's `tools`, or OpenAI's legacy `functions`: the schemas its `function_call` turns call, which are read
    as tool calls (their schemas were dropped, and the model trained to call functions it was never shown)."""
    if row.get("functions") and row.get("tools"):
        raise RowError("functions", "is set beside tools", "one of them (tools, the current form)")
    return check_tools(row["functions"], "functions") if row.get("functions") else check_tools(row.get("tools"))


def row_thinking(row: dict, thinking: bool | None) -> bool | None:
    """The mode read from the replies' think blocks, else the row's own boolean `thinking` column (every kind)."""
    return row["thinking"] if thinking is None and isinstance(row.get("thinking"), bool) else thinking


def prompt_messages(row: dict, key: str) -> list[dict]:
    """A prompt as messages: a string (a user turn, with `system` if given) or a conversation ending on a user turn."""
    value = row.get(key)
    if isinstance(value, str) or value is None:
        return with_system(row, [{"role": "user", "content": require_str(value, key, "a non-empty user turn")}])
    return with_system(row, check_messages(value, key, ends_with="user")[0])


def with_system(row: dict, messages: list[dict]) -> list[dict]:
    """The row's `system` column as the first turn of a prompt that has none of its own."""
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def check_no_row_reasoning(row: dict) -> None:
    """No column of reasoning text beside the replies (`reasoning`, `reasoning_content`, or `thinking` holding text,
    not the thinking mode): no reply reads it, so it would be left out of the set without a word."""
    for column in REASONING_FIELDS:
        if isinstance(row.get(column), str) and row[column].strip():
            raise RowError(column, "is reasoning text in a column of its own, which no reply reads",
                           "each reply's reasoning in the reply: `reasoning_content` on its assistant message, or a "
                           "leading <think>...</think> block of its text")


def reply_messages(value, key: str, prompt: list[dict]) -> tuple[list[dict], bool | None]:
    """A reply as messages after `prompt`: a string, or assistant (and tool) turns, which may end on a tool call;
    checked in the prompt's context."""
    if isinstance(value, str) or value is None:
        value = [{"role": "assistant", "content": require_str(value, key, "a non-empty assistant reply")}]
    value = require_list(value, key, "a non-empty assistant reply")
    return check_messages(value, key, context=prompt)


def _same(a: list[dict], b: list[dict]) -> bool:
    """Whether two replies say and do the same: their texts up to whitespace, and their tool calls (replies that call
    one tool with other arguments are a pair)."""
    def said(messages):
        return [(" ".join(text_of(m["content"]).split()), called(m.get("tool_calls"))) for m in messages]

    return said(a) == said(b)


def prompt_images(row: dict, prompt: list[dict], opts: Options) -> tuple[list[dict], list | None]:
    """The row's images, one per placeholder of the prompt, and the prompt with `<image>` markers as image parts."""
    images = _row_images(row, opts)
    check_image_slots([prompt], images)
    return (image_markers_to_parts(prompt) if images else prompt), images


def preference_record(row: dict, prompt, chosen, rejected, opts: Options) -> dict:
    """`chosen`/`rejected` are `(messages, thinking)` pairs from `reply_messages`; the pair thinks when either reply
    does (the mode was the chosen reply's, so a plain chosen reply made a thinking rejected one non-thinking)."""
    (chosen, chosen_mode), (rejected, rejected_mode) = chosen, rejected
    thinking = merged_mode((chosen_mode, rejected_mode))
    if _same(chosen, rejected):
        raise RowError("chosen", 'and "rejected" are identical', "two different replies")
    prompt, images = prompt_images(row, prompt, opts)
    thinking = row_thinking(row, thinking)
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "images": images, "thinking": thinking}
    return {**record, "tools": row_tools(row)}


def holds_prompt(row: dict, chosen, rejected) -> bool:
    """Whether chosen and rejected are whole conversations that hold the prompt: without a `prompt` column, or beside
    a text `prompt` repeating their user turn (UltraFeedback-binarized; TRL's `maybe_extract_prompt` reads it so)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return False
    first = chosen[0] if chosen else None
    return "prompt" not in row or (isinstance(row["prompt"], str) and isinstance(first, dict)
                                   and first.get("role") in ("system", "user"))


def conversations_prompt(row: dict, chosen: list, rejected: list) -> tuple[list, list, list]:
    """The prompt the conversations share (`implicit_prompt`), checked; a `prompt` column must be their user turn."""
    prompt, chosen, rejected = implicit_prompt(chosen, rejected)
    if not prompt:
        raise RowError("prompt", "is missing and chosen/rejected share no leading user turn",
                       "a `prompt` column, or conversations that start with the same user turn")
    prompt = with_system(row, check_messages(prompt, "prompt", ends_with="user")[0])
    asked = next(text_of(m["content"]) for m in reversed(prompt) if m["role"] == "user")
    if "prompt" in row and " ".join(row["prompt"].split()) != " ".join(asked.split()):
        raise RowError("prompt", "is not the last user turn that chosen and rejected start with",
                       "the conversations' own prompt (or no `prompt` column)")
    return prompt, chosen, rejected


def implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """TRL's `extract_prompt`: the shared leading turns are the prompt (importing trl costs ~6 s, so it is inlined).
    Turns are shared when they say and do the same: two samples of one tool call differ only in their random ids
    (and maybe in arguments written as JSON text). The prompt keeps chosen's turns, so an exchange whose id a later
    turn of `rejected` still refers to stays in the replies."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and _turn(chosen[shared]) == _turn(rejected[shared]):
        shared += 1
    while shared and (_assistant(chosen[shared - 1])
                      or (_ids(rejected[:shared]) - _ids(chosen[:shared])) & _refs(rejected[shared:])):
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _turn(message):
    """A turn as `implicit_prompt` compares it: its tool calls by what they do, its result without the call's id."""
    if not isinstance(message, dict):
        return message
    turn = {k: v for k, v in message.items() if k != "tool_call_id"}
    if isinstance(message.get("tool_calls"), list):
        try:
            turn["tool_calls"] = called(check_tool_calls(message["tool_calls"], "tool_calls"))
        except RowError:  # malformed: compared as written, and reported when the turn is checked
            pass
    return turn


def _assistant(message) -> bool:
    return isinstance(message, dict) and message.get("role") == "assistant"


def _ids(messages: list) -> set:
    """The ids of the tool calls in `messages`."""
    return {call.get("id") for m in messages if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
            for call in m["tool_calls"] if isinstance(call, dict) and isinstance(call.get("id"), str)}


def _refs(messages: list) -> set:
    """The call ids the tool results in `messages` refer to."""
    return {m["tool_call_id"] for m in messages if isinstance(m, dict) and isinstance(m.get("tool_call_id"), str)}


def desirability_label(value) -> bool | None:
    """A KTO label (`true`/`false`, 1/0, or their strings) as a bool; None for anything else (absent, per-turn lists)."""
    if isinstance(value, str):
        value = _LABELS.get(value.strip().lower(), value)
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    return None


def unpaired_record(row: dict, prompt: list[dict], completion: list[dict], key: str = "label",
                    opts: Options | None = None, thinking: bool | None = None) -> dict:
    """A KTO row; with `opts`, its images are read and checked as a pair's are (without, the row has none)."""
    label = desirability_label(row.get(key))
    if label is None:
        raise RowError(key, f"is {row.get(key)!r}", "true or false (is the reply desirable?)")
    images = None
    if opts is not None:
        prompt, images = prompt_images(row, prompt, opts)
    thinking = row_thinking(row, thinking)
    record = {"prompt": prompt, "completion": completion, "label": label, "images": images, "thinking": thinking}
    return {**record, "tools": row_tools(row)}


def split_last_reply(messages: list[dict], field: str) -> tuple[list[dict], list[dict]]:
    """A checked conversation as (prompt, completion): the completion is the last assistant turn and the tool
    turns and calls of its exchange (everything after the last user turn)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise RowError(field, "has no user turn", "a conversation with a prompt and a reply")
    return messages[:last_user + 1], messages[last_user + 1:]
