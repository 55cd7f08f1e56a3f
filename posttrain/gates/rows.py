"""SFT row gates: the columns SFTTrainer reads, well-formed conversations, and tools: the `tools` column, and tool
calls that the template writes into the trained tokens."""

from ..errors import UserError, row_name
from ..models.vision import message_text

SFT_FORMATS = (("messages",), ("prompt", "completion"), ("text",))  # what SFTTrainer reads


def check_sft_columns(dataset, name: str, text_field: str = "text", assistant_only_loss: bool = False) -> None:
    """The SFT rows are in a format TRL's SFTTrainer reads (`text_field`: its `dataset_text_field`), and there are
    some: otherwise the stage would drop every column it does not know and TRL would stop on an empty first row
    (`StopIteration`)."""
    columns = dataset.column_names
    if not any(set(form) <= set(columns) for form in (*SFT_FORMATS, (text_field,))):
        raise UserError(f"pre-flight: {name}: SFT rows need a `messages` column (conversations), `prompt` and "
                        f"`completion`, or `{text_field}`; it has: {', '.join(columns) or 'no columns'}. Other formats "
                        "(Alpaca instruction/input/output, ShareGPT conversations, ...) convert with "
                        "`posttrain data build_sft_set --sources FILE --output_dir DIR`")
    if len(dataset) == 0:
        raise UserError(f"pre-flight: {name}: no rows to train on")
    if assistant_only_loss:
        from trl.data_utils import is_conversational

        if not is_conversational(dataset[0]):
            raise UserError(f"pre-flight: {name}: assistant_only_loss needs conversational rows (`messages`, or "
                            "prompt/completion as lists of {role, content} messages); these are plain text. For "
                            "prompt/completion text rows drop assistant_only_loss: TRL trains on the completion only "
                            "already (completion_only_loss)")


def check_conversations(dataset, name: str) -> None:
    """Every conversational row is a list of turns with a text role and a text (or parts) content, has at least one
    assistant turn and no empty one; names the row. Run before any check that renders rows with the chat template,
    which would otherwise stop on such a row with a bare Jinja or TypeError."""
    if "messages" not in dataset.column_names:
        return
    for index, messages in enumerate(dataset["messages"]):
        if not isinstance(messages, list):
            found = "missing" if messages is None else f"a {type(messages).__name__}"
            raise UserError(f"pre-flight: {name} {row_name(index)}: \"messages\" is {found}; expected a list of "
                            "{role, content} turns")
        for turn, message in enumerate(messages, 1):
            _check_turn(message, f"pre-flight: {name} {row_name(index)}: turn {turn}")
        _check_tool_turns(messages, f"pre-flight: {name} {row_name(index)}")
        replies = [m for m in messages if m.get("role") == "assistant"]
        if not replies:
            roles = ", ".join(sorted({m["role"] for m in messages})) or "no turns"
            raise UserError(f"pre-flight: {name} {row_name(index)}: no assistant turn (roles: {roles}); expected at "
                            "least one reply to train on, with role 'assistant'")
        for turn, message in enumerate(replies, 1):
            if not message_text(message.get("content")).strip() and not message.get("tool_calls"):
                raise UserError(
                    f"pre-flight: {name} {row_name(index)}: assistant turn {turn} is empty; expected a non-empty reply"
                )


def check_tools_column(dataset, name: str) -> None:
    """Each row's `tools` (TRL's column of function schemas) is a list of schema mappings, its JSON text, or empty;
    names the row. A bad one stopped TRL's tokenization with a bare JSONDecodeError, or transformers' "Tools should
    either be a JSON schema, or a callable function"."""
    import json

    if "tools" not in dataset.column_names:
        return
    for index, tools in enumerate(dataset["tools"]):
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except ValueError as exc:
                raise UserError(f"pre-flight: {name} {row_name(index)}: \"tools\" is text that is not valid JSON "
                                f"({exc}); expected a list of function schemas") from exc
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise UserError(f"pre-flight: {name} {row_name(index)}: \"tools\" is {tools!r:.60}; expected a list of "
                            'function schemas, [{"type": "function", "function": {"name", "parameters"}}, ...]')


def _check_turn(message, where: str) -> None:
    """One turn: a {role, content} mapping whose role is text and whose content is text or a list of parts (a call
    to tools may leave it out)."""
    if not isinstance(message, dict):
        raise UserError(f"{where} is a {type(message).__name__}; expected a {{role, content}} mapping")
    if not isinstance(message.get("role"), str) or not message["role"]:
        raise UserError(f"{where} has no role; expected one of system, user, assistant, tool")
    content = message.get("content")
    if not isinstance(content, (str, list)) and not (content is None and message.get("tool_calls")):
        found = "no content" if content is None else f"content {content!r} ({type(content).__name__})"
        raise UserError(f"{where} ({message['role']}) has {found}; expected text or a list of parts")


def _check_tool_turns(messages: list[dict], where: str) -> None:
    """Each tool call names its function and gives its arguments as a JSON object (`_call_problem`), and each `tool`
    turn answers a call: an assistant turn with `tool_calls` before it, or another result of the same calls."""
    called = False
    for turn, message in enumerate(messages, 1):
        if message["role"] == "tool" and not called:
            raise UserError(f"{where}: turn {turn} is a tool result with no tool call before it; expected a `tool` "
                            "turn only after an assistant turn with `tool_calls` (or after another tool result)")
        calls = message.get("tool_calls") or []
        for number, call in enumerate(calls, 1):
            if problem := _call_problem(call):
                raise UserError(f"{where}: turn {turn} ({message['role']}) tool call {number}: {problem}")
        called = bool(calls) or (called and message["role"] == "tool")


def _call_problem(call) -> str | None:
    """What is wrong with one tool call, or None. The template writes arguments given as text into the trained reply
    as they are: text that is not a JSON object would teach the model calls no tool can parse."""
    import json

    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return f'is {call!r:.60}; expected {{"type": "function", "function": {{"name", "arguments"}}}}'
    if not isinstance(function.get("name"), str) or not function["name"].strip():
        return "has no function name; expected the called tool's name in function.name"
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            return f"arguments {function['arguments']!r:.60} are not valid JSON ({exc}); expected a JSON object"
    if not isinstance(arguments, dict):
        return f"arguments are {arguments!r:.60}; expected a JSON object ({{}} for a call without arguments)"
    return None


def _first_tool_call_row(dataset) -> int | None:
    """The first row that calls a tool, and that has a tool result too where one does (the results' check needs
    one): function-calling sets often end their conversations on the call."""
    if "messages" not in dataset.column_names:
        return None
    first = None
    for index, messages in enumerate(dataset["messages"]):  # a row without messages is the row gate's to name
        if any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages or []):
            if any(m.get("role") == "tool" for m in messages):
                return index
            first = index if first is None else first
    return first


def check_tool_calls(tokenizer, dataset, name: str) -> dict:
    """Rows that call tools: the chat template must write each call (function name and argument values) into the
    trained tokens, and keep the tool results out of them. A template that drops `tool_calls` (many do, silently)
    would train the model to answer without ever calling; one that trains on tool results would teach it to invent
    them. Checked on the first tool-calling row with a result (`_first_tool_call_row`), rendered exactly as TRL
    renders it (with its `tools`)."""
    import json

    from trl.chat_template_utils import has_generation_markers, supports_tool_calling

    index = _first_tool_call_row(dataset)
    if index is None:
        return {}
    if not supports_tool_calling(tokenizer):
        raise UserError(f"pre-flight: {name} has tool calls ({row_name(index)}) but the chat template drops tool "
                        "calls or tool results; set `base.chat_template` to a template that renders them (built-ins: "
                        "chatml, ernie4_5)")
    row = dataset[index]
    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
    out = tokenizer.apply_chat_template(row["messages"], tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, **(row.get("chat_template_kwargs") or {}))
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    if not has_generation_markers(tokenizer.chat_template):
        trained = tokenizer.decode(out["input_ids"])  # no mask to check: the call must at least be rendered
    for message in row["messages"]:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments") or {}
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            missing = [v for v in [function["name"], *_leaf_values(arguments)] if not _written(v, trained)]
            if missing:
                raise UserError(f"pre-flight: {name} {row_name(index)}: the tool call {function['name']}(...) does "
                                f"not survive the chat template: {', '.join(map(repr, missing))} not in the trained "
                                "tokens; expected the call inside the template's {% generation %} markers")
        if message.get("role") == "tool" and len(message.get("content") or "") >= 8 and message["content"] in trained:
            raise UserError(f"pre-flight: {name} {row_name(index)}: a tool result is inside the trained tokens; "
                            "expected tool turns outside the template's {% generation %} markers (the model must not "
                            "learn to write tool results)")
    return {"tool_call_row_checked": index}


def _leaf_values(value) -> list:
    """The strings, numbers, booleans and nulls inside tool-call arguments: templates write lists and objects their
    own way (spacing, escapes), so the gate looks for each value, not for one spelling of a container."""
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaf_values(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaf_values(item)]
    return [value]


def _written(value, text: str) -> bool:
    """Whether an argument value is in a rendered text: a string as it is or JSON-escaped (a template's `tojson`
    writes a quote as \\" and a newline as \\n, non-ASCII as it is or as \\u escapes), anything else as JSON."""
    import json

    if not isinstance(value, str):
        return json.dumps(value) in text
    return any(spelling in text for spelling in (value, json.dumps(value, ensure_ascii=False)[1:-1],
                                                 json.dumps(value)[1:-1]))
