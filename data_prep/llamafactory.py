"""LLaMA-Factory's formats: Alpaca and ShareGPT (SFT, preference with `ranking`, KTO with a label) and the newer
`messages` / `chosen_messages` / `rejected_messages` rows whose contents are typed `{"type", "value"}` parts.

ShareGPT rows use LLaMA-Factory's default tags (`from`/`value`, `human`/`gpt`/`observation`/`function_call`); other
tags (`role`/`content`, OpenAI names) are mapped by `registry` from a `dataset_info.json` entry before they get here.
"""

import json
import re

from posttrain.data import REASONING_FIELDS

from .messages import RowError, check_messages, check_tool_calls, require_list, require_str
from .records import (
    Options,
    check_no_row_reasoning,
    implicit_prompt,
    preference_record,
    reply_messages,
    sft_record,
    split_last_reply,
    unpaired_record,
)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "system": "system", "observation": "tool",
                  "tool": "tool", "function": "tool", "function_call": "assistant"}


def sharegpt_message(turn, field: str) -> dict:
    """One `{from, value}` turn as a message; LLaMA-Factory's `function_call` turns become assistant tool calls."""
    if not isinstance(turn, dict):
        raise RowError(field, f"is a {type(turn).__name__}", "a {from, value} turn")
    speaker = turn.get("from")
    if speaker not in SHAREGPT_ROLES:
        raise RowError(f"{field}.from", f"is {speaker!r}", f"one of {', '.join(SHAREGPT_ROLES)}")
    value = turn.get("value")
    if speaker != "function_call":
        # a turn's reasoning (`reasoning_content`, `thinking`, `reasoning`) is read as in `messages` rows
        message = {"role": SHAREGPT_ROLES[speaker], "content": value,
                   **{key: turn[key] for key in REASONING_FIELDS if turn.get(key) is not None}}
        if turn.get("tool_calls"):  # an OpenAI-tagged assistant turn (`tags: {role_tag: role, ...}`) calling tools
            message["tool_calls"] = check_tool_calls(turn["tool_calls"], f"{field}.tool_calls")
        return message
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise RowError(f"{field}.value", "is not valid JSON", "a JSON {name, arguments}") from None
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", "content": "", "tool_calls": check_tool_calls(calls, f"{field}.value")}


def _sharegpt_turns(row: dict) -> list[dict]:
    turns = require_list(row.get("conversations"), "conversations", "a list of {from, value} turns")
    return [sharegpt_message(turn, f"conversations[{i}]") for i, turn in enumerate(turns)]


def _check_sharegpt(row: dict, ends_with: str = "assistant") -> tuple[list[dict], bool | None]:
    """`check_messages` on the turns, its errors naming a turn's text by the row's own key, `value` (not `content`)."""
    try:
        return check_messages(_sharegpt_turns(row), "conversations", ends_with=ends_with)
    except RowError as exc:
        match = re.fullmatch(r"(conversations\[\d+\])\.content", exc.field)
        if match is None:
            raise
        raise RowError(f"{match.group(1)}.value", exc.problem, exc.expected) from None


def from_sharegpt(row: dict, opts: Options) -> dict:
    """ShareGPT `conversations: [{from, value}]`; LLaMA-Factory's `function_call`/`observation` turns become tools."""
    check_no_row_reasoning(row)
    messages, thinking = _check_sharegpt(row)
    return sft_record(row, messages, thinking, opts, row.get("system"))


def from_sharegpt_preference(row: dict, opts: Options) -> dict:
    """LLaMA-Factory's ShareGPT preference rows (`ranking: true`): `conversations` ending on a user turn, `chosen` and
    `rejected` each one `{from, value}` message (or a list of them)."""
    prompt = _check_sharegpt(row, ends_with="user")[0]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    replies = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        turns = value if isinstance(value, list) else [value]
        if value is None or isinstance(value, str):
            replies.append(reply_messages(value, key, prompt))
            continue
        replies.append(reply_messages([sharegpt_message(t, f"{key}[{i}]") for i, t in enumerate(turns)], key, prompt))
    return preference_record(row, prompt, replies[0], replies[1], opts)


def from_kto_conversation(row: dict, opts: Options) -> dict:
    """LLaMA-Factory's KTO rows: a conversation (`messages` or ShareGPT `conversations`) and a boolean `label` that
    says whether its last reply is desirable. Read as unpaired `prompt/completion/label` rows, never as SFT."""
    if "conversations" in row:
        messages, thinking = _check_sharegpt(row)
    else:
        messages, thinking = check_messages(typed_parts_as_text(row.get("messages"), "messages"), "messages")
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    prompt, completion = split_last_reply(messages, "messages")
    return unpaired_record(row, prompt, completion, opts=opts, thinking=thinking)


def from_alpaca(row: dict, opts: Options) -> dict:
    """Alpaca `instruction`, `input`, `output`, optional `system` and `history: [[query, reply], ...]`."""
    check_no_row_reasoning(row)
    messages = alpaca_history(row) + [{"role": "user", "content": alpaca_prompt(row)}]
    messages.append({"role": "assistant", "content": require_str(row.get("output"), "output", "the reply text")})
    try:
        messages, thinking = check_messages(messages, "conversation")
    except RowError as exc:  # name the row's own key, not a position in the conversation built from it
        raise alpaca_field_error(exc, len(messages)) from None
    return sft_record(row, messages, thinking, opts, row.get("system"))


def alpaca_field_error(exc: RowError, count: int) -> RowError:
    """`exc` about `conversation[i]...` as one about `history[j][k]`, `instruction` or `output`."""
    match = re.fullmatch(r"conversation\[(\d+)\](\..*)?", exc.field)
    if match is None:
        return exc
    i = int(match.group(1))
    field = "output" if i == count - 1 else "instruction" if i == count - 2 else f"history[{i // 2}][{i % 2}]"
    return RowError(field, str(exc)[len(exc.field) + 3:])


def alpaca_prompt(row: dict) -> str:
    instruction = require_str(row.get("instruction"), "instruction", "the task text")
    extra = row.get("input") or ""
    extra = require_str(extra, "input", "a string", allow_empty=True)
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def alpaca_history(row: dict) -> list[dict]:
    history = row.get("history") or []
    require_list(history, "history", "a list of [query, reply] pairs", allow_empty=True)
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RowError(f"history[{i}]", f"is {pair!r}"[:80], "a [query, reply] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


# ----------------------------------------------------------------------------------------------------------------------
# The newer format: typed `{"type", "value"}` content parts, a per-message `loss_weight`
# ----------------------------------------------------------------------------------------------------------------------
def has_typed_parts(messages) -> bool:
    """Whether a conversation is in the newer LLaMA-Factory form (a content part with a `value`)."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and "value" in p for p in m["content"]) for m in messages)


def _typed_message(message, field: str) -> dict:
    """`{"role", "content": [{"type": "text"|"reasoning"|"tool_call", "value"}], "loss_weight"}` as a message."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    text, reasoning, calls = [], [], []
    for i, part in enumerate(message["content"]):
        kind = part.get("type") if isinstance(part, dict) else None
        value = part.get("value") if isinstance(part, dict) else None
        where = f"{field}.content[{i}]"
        if kind == "text":
            text.append(require_str(value, f"{where}.value", "a string", allow_empty=True))
        elif kind == "reasoning":
            reasoning.append(require_str(value, f"{where}.value", "the reasoning text", allow_empty=True))
        elif kind == "tool_call":
            try:
                calls.append(json.loads(value) if isinstance(value, str) else value)
            except json.JSONDecodeError:
                raise RowError(f"{where}.value", "is not valid JSON", 'a JSON {"name", "arguments"}') from None
        else:
            raise RowError(where, f"has type {kind!r}", 'a {"type": "text"|"reasoning"|"tool_call", "value": ...} part')
    out = {k: v for k, v in message.items() if k not in ("content", "loss_weight")}
    out["content"] = "".join(text)
    if reasoning and "".join(reasoning).strip():
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = check_tool_calls(calls, f"{field}.content")
    return out


def typed_parts_as_text(messages, field: str):
    """Messages with typed `value` parts as plain messages; other conversations are returned unchanged."""
    if not has_typed_parts(messages):
        return messages
    return [_typed_message(m, f"{field}[{i}]") for i, m in enumerate(messages)]


def drop_untrained_tail(messages: list, field: str) -> list:
    """Turns after the last assistant turn with a non-zero `loss_weight` train nothing, so they go; TRL has no
    per-turn weights, so an earlier `loss_weight: 0` reply stays as context and is trained like the others."""
    weights = [m.get("loss_weight") for m in messages if isinstance(m, dict)]
    if all(w is None for w in weights):
        return messages
    trained = [i for i, m in enumerate(messages)
               if isinstance(m, dict) and m.get("role") == "assistant" and m.get("loss_weight", 1.0) != 0]
    if not trained:
        raise RowError(field, "has no assistant turn with a non-zero loss_weight", "at least one reply to train on")
    return messages[:trained[-1] + 1]


def from_pairwise_messages(row: dict, opts: Options) -> dict:
    """`chosen_messages` / `rejected_messages`: two whole conversations (typed parts or plain strings) that share
    their prompt turns and differ in the last reply."""
    chosen = typed_parts_as_text(require_list(row.get("chosen_messages"), "chosen_messages", "a conversation"),
                                 "chosen_messages")
    rejected = typed_parts_as_text(require_list(row.get("rejected_messages"), "rejected_messages", "a conversation"),
                                   "rejected_messages")
    prompt, chosen, rejected = implicit_prompt(chosen, rejected)
    if not prompt:
        raise RowError("chosen_messages", "and rejected_messages share no leading user turn",
                       "two conversations that start with the same prompt turns")
    prompt = check_messages(prompt, "chosen_messages", ends_with="user")[0]
    return preference_record(row, prompt, reply_messages(chosen, "chosen_messages", prompt),
                             reply_messages(rejected, "rejected_messages", prompt), opts)
