"""Checks and normalisation of conversations, thinking blocks, tool calls and image paths, shared by every format.

A conversation leaves here in TRL's conversational form: `[{"role", "content"}, ...]` with `content` a string (or a
list of typed parts for vision), assistant thinking folded into the content as a `<think>\\n…\\n</think>\\n\\n` prefix,
tool calls as `{"type": "function", "function": {"name", "arguments": dict}}`. Problems raise `RowError`, whose text
names the field and says what was expected, so the caller only adds `FILE:LINE: `.
"""

import json
import re

from posttrain.data import reasoning_key

ROLES = ("system", "user", "assistant", "tool")
THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)
# OpenThoughts', Bespoke-Stratos' and Sky-T1's reasoning block: kept as written (their system prompt asks for it)
THOUGHT = re.compile(r"\s*<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>", re.S)


class RowError(ValueError):
    """A row that breaks its format. `str(error)` reads `"chosen" is empty; expected a non-empty assistant reply`."""

    def __init__(self, field: str, problem: str, expected: str | None = None):
        self.field, self.problem, self.expected = field, problem, expected
        super().__init__(f'"{field}" {problem}' + (f"; expected {expected}" if expected else ""))


class RowSkip(RowError):
    """A well-formed row that gives nothing to train on (rated responses closer than the margin): filtered, not bad."""


def require_str(value, field: str, what: str, allow_empty: bool = False) -> str:
    """`value` as a string, or a `RowError` naming `field` and `what` it should be."""
    if value is None:
        raise RowError(field, "is missing", what)
    if not isinstance(value, str):
        raise RowError(field, f"is a {type(value).__name__} ({_short(value)})", what)
    if not allow_empty and not value.strip():
        raise RowError(field, "is empty", what)
    return value


def require_list(value, field: str, what: str, allow_empty: bool = False) -> list:
    if value is None:
        raise RowError(field, "is missing", what)
    if not isinstance(value, list):
        raise RowError(field, f"is a {type(value).__name__} ({_short(value)})", what)
    if not value and not allow_empty:
        raise RowError(field, "is an empty list", what)
    return value


def require_str_list(value, field: str, what: str) -> list[str]:
    """A list of strings (a lone string counts as a list of one), each checked with `require_str`."""
    value = [value] if isinstance(value, str) else require_list(value, field, what)
    for i, item in enumerate(value):
        require_str(item, f"{field}[{i}]", what)
    return value


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def text_of(content) -> str:
    """The text of a message content: the string itself, or the text parts of a vision content list."""
    if isinstance(content, list):
        return "\n".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return content or ""


def split_think(content: str, field: str, answer_optional: bool = False) -> tuple[str, bool | None]:
    """Canonical `<think>` prefix and the turn's mode: True (thinks), False (empty think block), None (no block).
    With `answer_optional` (a turn that calls tools), nothing after `</think>` is fine: the calls follow."""
    if opens_no_think(content):  # DeepSeek-R1's generation prompt opens the block: its saved replies start inside it
        content = "<think>" + content  # (TRL's parser for its template reads them so too); the build warns of it
    match = THINK.match(content)
    if match is None and (thought := THOUGHT.match(content)) and thought.group(1).strip():
        return content, True  # a thinking reply in another notation: trained in thinking mode, not after an empty block
    if match is None:
        if content.lstrip().startswith("<think>"):
            raise RowError(field, "opens <think> but never closes it", "'<think>…</think>' then the answer")
        if "<think>" in content.split("</think>")[0]:
            raise RowError(field, "has a <think> block after other text", "'<think>…</think>' first, then the answer")
        if "</think>" in content:
            raise RowError(field, "has '</think>' without an opening '<think>' before it",
                           "'<think>…</think>' then the answer (or a DeepSeek-R1 reply saved without its opening "
                           "'<think>': the reasoning, one '</think>', then the answer)")
        return content, None
    reasoning, answer = match.group(1).strip(), content[match.end():]
    if not answer.strip() and not answer_optional:
        raise RowError(field, "has a <think> block but no answer after it", "the answer after '</think>'")
    if not reasoning:
        return answer, False
    return f"<think>\n{reasoning}\n</think>\n\n{answer}", True


UNOPENED_THINK_NOTE = ("a reply that closes '</think>' without opening it (DeepSeek-R1's template opens it in the "
                       "generation prompt, so its saved replies lack it): read as thinking, '<think>' prepended")


def opens_no_think(text) -> bool:
    """A reply that closes one think block it never opens: a DeepSeek-R1 reply saved without its generation prompt's
    `<think>`, which `split_think` opens for it."""
    return isinstance(text, str) and "<think>" not in text and text.count("</think>") == 1


def has_unopened_think(value) -> bool:
    """Whether a raw row holds a text `opens_no_think` (the note for a row `split_think` opened a block in)."""
    if isinstance(value, dict):
        return any(map(has_unopened_think, value.values()))
    if isinstance(value, list):
        return any(map(has_unopened_think, value))
    return opens_no_think(value)


def with_reasoning(content: str, message: dict, field: str) -> str:
    """Fold a message's separate reasoning field (`reasoning_content`, `thinking`, `reasoning`) into the content as a
    `<think>` prefix; errors name the field it is under."""
    key = reasoning_key(message)
    reasoning = None if key is None else message[key]
    if reasoning is None or (isinstance(reasoning, str) and not reasoning.strip()):
        return content
    reasoning = require_str(reasoning, f"{field}.{key}", "a string")
    if THINK.match(content):
        raise RowError(field, f"has both '{key}' and a <think> block in 'content'", "only one of them")
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content}"


def check_content(content, field: str, role: str, allow_empty: bool = False):
    """A message content: a string, or a list of `{"type": "text"|"image", ...}` parts (vision)."""
    what = f"a non-empty {role} turn" if role != "assistant" else "a non-empty assistant reply"
    if isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise RowError(f"{field}[{i}]", f"is {_short(part)}", '{"type": "text", "text": ...} or {"type": "image"}')
            if part["type"] == "text":
                require_str(part.get("text"), f"{field}[{i}].text", "a string", allow_empty=True)
        if not any(part["type"] == "image" for part in content):
            content = text_of(content)  # OpenAI text parts: a string, as text chat templates and <think> checks read
            return require_str(content, field, what, allow_empty=allow_empty)
        if not allow_empty and not text_of(content).strip():
            raise RowError(field, "is empty", what)
        return content
    return require_str(content, field, what, allow_empty=allow_empty)


def check_tool_calls(calls, field: str) -> list[dict]:
    """Tool calls as TRL and chat templates read them; JSON-string arguments are decoded to a dict. A call's `id` is
    kept: the `tool_call_id` of its result points at it, and some templates (Gemma 4's) name a result's tool by it."""
    calls = require_list(calls, field, 'a list of {"type": "function", "function": {"name", "arguments"}}')
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RowError(f"{field}[{i}]", f"is {_short(call)}", 'a {"function": {"name", "arguments"}} object')
        name = require_str(function.get("name"), f"{field}[{i}].function.name", "the called tool's name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise RowError(f"{field}[{i}].function.arguments", "is not valid JSON", "a JSON object") from None
        if not isinstance(arguments, dict):
            raise RowError(f"{field}[{i}].function.arguments", f"is {_short(arguments)}", "a JSON object")
        call_id = {"id": require_str(call["id"], f"{field}[{i}].id", "a string")} if call.get("id") is not None else {}
        out.append({**call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def check_tools(tools, field: str = "tools") -> list[dict] | None:
    """The `tools` column: JSON schemas of the callable functions, as `{"type": "function", "function": {...}}`."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError(field, "is a string that is not valid JSON", "a list of function schemas") from None
    tools = require_list(tools, field, "a list of function schemas")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise RowError(f"{field}[{i}]", f"is {_short(tool)}", 'a {"name", "parameters"} function schema')
        require_str(function.get("name"), f"{field}[{i}].name", "the function's name")
        out.append({"type": "function", "function": function})
    return out


def _check_order(roles: list[str], pending_tools: list[bool], field: str, offset: int = 0):
    """system first if at all; then user, assistant, [tool...], assistant, user, ... strictly alternating.

    The first `offset` roles are context already checked (a prompt before its reply); errors index the rest.
    """
    previous = None
    for i, role in enumerate(roles):
        where = f"{field}[{i - offset}].role"
        if role == "system":
            if i != 0:
                raise RowError(where, "is 'system' after the first message", "a system message only first")
            continue
        allowed = {None: ("user",), "user": ("assistant",), "tool": ("tool", "assistant")}.get(previous)
        if previous == "assistant":
            allowed = ("tool",) if pending_tools[i - 1] else ("user",)
        if role not in allowed:
            after = f"after '{previous}'" if previous else "as the first turn"
            raise RowError(where, f"is '{role}' {after} (wrong role order)", f"'{allowed[0]}'")
        previous = role


def check_messages(messages, field: str = "messages", ends_with: str = "assistant",
                   context: list[dict] | None = None) -> tuple[list[dict], bool | None]:
    """Validate and normalise a conversation.

    Args:
        messages (`list[dict]`): `[{"role", "content", "reasoning_content"?, "tool_calls"?, "name"?}, ...]`.
        field (`str`, *optional*, defaults to `"messages"`): name used in errors.
        ends_with (`str`, *optional*, defaults to `"assistant"`): `"assistant"` (a training conversation or a
            preference or KTO reply: the model's turn last, which may be a tool call: function-calling sets such as
            xLAM's end on the call, and a pair's call is what it is judged on), `"user"` (a prompt: the last turn is
            the user's or a tool result), or `"any"`.
        context (`list[dict]`, *optional*): normalised messages that come before (the prompt of a reply); only the
            role order is checked across them.

    Returns:
        `(messages, thinking)`: the normalised messages and the conversation's thinking mode (True, False or None).
    """
    messages = require_list(messages, field, "a list of {role, content} messages")
    out, modes, pending = [], [], []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"is {_short(message)}", "a {role, content} message")
        message = _from_legacy_functions(message, where)
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"is {_short(role)}", f"one of {', '.join(ROLES)}")
        normalised, mode = _check_message(message, role, where)
        out.append(normalised)
        modes.append(mode)
        pending.append(bool(normalised.get("tool_calls")))
    context = context or []
    roles = [m["role"] for m in context + out]
    _check_order(roles, [bool(m.get("tool_calls")) for m in context] + pending, field, offset=len(context))
    last = out[-1]["role"]
    if ends_with == "assistant" and last != "assistant":
        raise RowError(f"{field}[{len(out) - 1}]", f"is a '{last}' turn at the end", "an assistant reply last")
    if ends_with == "user" and last not in ("user", "tool"):
        raise RowError(f"{field}[{len(out) - 1}]", f"is a '{last}' turn at the end of the prompt", "a user turn last")
    return out, merged_mode(modes)


def merged_mode(modes) -> bool | None:
    """The thinking mode of turns (or replies) of these modes: thinking if any thinks, else non-thinking if any says
    so, else None (unsaid)."""
    return True if True in modes else (False if False in modes else None)


def _from_legacy_functions(message: dict, where: str) -> dict:
    """OpenAI's legacy function calling in its current form, which TRL and chat templates read: an assistant turn's
    `function_call` as its one `tool_calls` entry, a `function` turn (the result) as a `tool` turn. Read as they
    were, such turns were refused as an assistant reply with no content."""
    if message.get("role") == "function":
        return {**message, "role": "tool"}
    if message.get("function_call") is None:
        return message
    if message.get("tool_calls"):
        raise RowError(f"{where}.function_call", "is set beside tool_calls", "one of them (tool_calls, the current form)")
    rest = {key: value for key, value in message.items() if key != "function_call"}
    return {**rest, "tool_calls": [{"type": "function", "function": message["function_call"]}]}


def _check_message(message: dict, role: str, where: str) -> tuple[dict, bool | None]:
    if role == "assistant" and message.get("tool_calls"):
        calls = check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        content = check_content(message.get("content") or "", f"{where}.content", role, allow_empty=True)
        mode = None
        if isinstance(content, str):  # reasoning before a call is trained like any other reply's
            content = with_reasoning(content, message, where)
            content, mode = split_think(content, f"{where}.content", answer_optional=True)
        return {"role": role, "content": content, "tool_calls": calls}, mode
    content = message.get("content")
    if role == "tool" and _is_json_result(content):  # ERNIEKit: a tool's result as JSON objects, not text
        content = json.dumps(content[0] if isinstance(content, list) and len(content) == 1 else content,
                             ensure_ascii=False)
    content = check_content(content, f"{where}.content", role, allow_empty=role == "tool")
    out = {"role": role, "content": content}
    mode = None
    if role == "assistant" and isinstance(content, str):
        content = with_reasoning(content, message, where)
        out["content"], mode = split_think(content, f"{where}.content")
    elif message.get("reasoning_content"):
        raise RowError(f"{where}.reasoning_content", f"is set on a '{role}' turn", "reasoning on assistant turns only")
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                out[key] = require_str(message[key], f"{where}.{key}", "a string")
    return out, mode


def _is_json_result(content) -> bool:
    """A tool result given as a JSON object or a list of them (rather than text or typed vision parts)."""
    if isinstance(content, dict):
        return True
    return isinstance(content, list) and bool(content) and all(
        isinstance(item, dict) and item.get("type") not in ("text", "image") for item in content)
