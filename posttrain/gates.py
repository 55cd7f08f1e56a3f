"""Pre-flight gates: checks that stop a run before it trains on something silently broken.

Each failure here is one users of TRL-based tools discover after hours of training: an assistant mask that is empty
(the loss trains on nothing, or on the prompt), an end-of-turn token that never gets a label (the model never
stops), a chat template without `{% generation %}` markers while assistant-only loss was asked for, chosen == rejected
pairs. The checks use the trainer's own tokenized data and collator where they can, so they test what will train.
"""

import logging
import os
import re

from .data import REASONING_FIELDS, message_reasoning, preference_texts, prompt_text, reply_text, template_kwargs
from .errors import UserError, row_name
from .models.templates import IMAGE_PLACEHOLDERS
from .models.vision import has_images, is_processor, message_text, text_tokenizer

logger = logging.getLogger("posttrain")


def check_template_markers(tokenizer, assistant_only_loss: bool) -> None:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if assistant_only_loss and (template is None or not has_generation_markers(template)):
        try:  # a known template (Qwen, Llama 3, Gemma, Phi, ...): TRL's SFTTrainer trains with its marked copy
            if template is not None and get_training_chat_template(tokenizer):
                return
        except (ValueError, TypeError):
            pass
        raise UserError(
            "pre-flight: assistant_only_loss is on, but the chat template has no {% generation %} markers, so no "
            f"assistant mask can be built. Set `base.chat_template` to {training_templates(tokenizer)}, or set "
            "assistant_only_loss: false."
        )


def training_templates(tokenizer) -> str:
    """The advice for a template without markers: only the built-ins whose turn tokens this vocabulary has (chatml
    on a Llama-3 vocabulary spells <|im_end|> in pieces, and no reply would end with an end-of-turn token), and
    TRL's marked copies of other families' templates (`*_training.jinja`), which take a path."""
    from pathlib import Path

    import trl

    from .models.templates import END_OF_TURN

    vocab = tokenizer.get_vocab()
    builtins = sorted(name for name, token in END_OF_TURN.items() if token in vocab and name != "chatml_vl")
    folder = Path(trl.__file__).parent / "chat_templates"
    marked = f"a .jinja file with the markers (TRL's for other families, such as {folder / 'llama3_training.jinja'}, " \
             f"are in {folder})"
    return f"a built-in training template ({', '.join(builtins)}) or {marked}" if builtins else marked


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


def check_template_renders(tokenizer, dataset, name: str) -> None:
    """The chat template renders every kind of conversation (one row per sequence of roles): a model's own template
    may refuse some, e.g. Gemma-2's raises "System role not supported" on a system turn, which stopped the stage
    inside TRL's tokenization with a bare Jinja error. Names the row and what to do."""
    from jinja2 import TemplateError

    if "messages" not in dataset.column_names:
        return
    seen = set()
    for index, messages in enumerate(dataset["messages"]):
        roles = tuple(m.get("role") for m in messages)
        if roles in seen:
            continue
        seen.add(roles)
        try:
            tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError as exc:
            advice = ("Set base.chat_template to one that renders such rows (a .jinja file; TRL's "
                      "gemma3_training.jinja takes a system turn for Gemma)")
            if "system" in roles:
                advice = ("Put the system text at the start of the first user turn (the template has no system role), "
                          "or s" + advice[1:])
            raise UserError(f"pre-flight: {name} {row_name(index)} (roles: {', '.join(roles)}): the chat template "
                            f"refuses it: {exc}. {advice}") from exc


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
    if "messages" not in dataset.column_names:
        return None
    for index, messages in enumerate(dataset["messages"]):  # a row without messages is the row gate's to name
        if any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages or []):
            return index
    return None


def check_tool_calls(tokenizer, dataset, name: str) -> dict:
    """Rows that call tools: the chat template must write each call (function name and argument values) into the
    trained tokens, and keep the tool results out of them. A template that drops `tool_calls` (many do, silently)
    would train the model to answer without ever calling; one that trains on tool results would teach it to invent
    them. Checked on the first tool-calling row, rendered exactly as TRL renders it (with its `tools`)."""
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
        if row["prompt"] is None or _reply(row["chosen"]) is None or _reply(row["rejected"]) is None:
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


def check_prompt_boundary(tokenizer, dataset, name: str, samples: int = 8) -> dict:
    """The prompt a reply is generated from must be tokenized the same way in training as when the model answers.

    Training tokenizes a whole conversation at once; generation tokenizes the prompt alone and the model writes the
    reply after it. With a byte-level BPE that splits on GPT-2's rule (SmolLM2's), a prompt whose text ends in a run
    of whitespace is one token when it ends the string ("</think>\\n\\n" -> "\\n\\n") but splits when a reply
    follows ("\\n", "\\n", "4"), so every reply would be learned after a context the model never sees at inference
    (the default run's non-thinking accuracy: 51.3% as generated, 56.6% with its prompts tokenized as in training).
    TRL warns about this for prompt/completion rows, not for conversations (nor for DPO's pairs, tokenized the same
    way). This checks the first rows of each thinking mode on the text the template renders, and warns: a template
    that came with the model may not be ours to change. Returns what it found for the pre-flight record.
    """
    reply_column = next((c for c in ("completion", "chosen") if c in dataset.column_names), None)
    if "messages" not in dataset.column_names and not ("prompt" in dataset.column_names and reply_column):
        return {}
    checked, mismatched, example, modes = 0, 0, None, {}
    rewritten, rewrite = 0, None
    for row in dataset.select(range(min(len(dataset), 200))):
        if "messages" in row:
            prompt_turns, reply = (row["messages"] or [])[:-1], (row["messages"] or [])[-1:]
        else:
            prompt_turns, reply = row["prompt"], row[reply_column]
        kwargs = row.get("chat_template_kwargs") or {}
        mode = kwargs.get("enable_thinking")
        if (not isinstance(prompt_turns, list) or not prompt_turns or not isinstance(reply, list) or not reply
                or reply[-1].get("role") != "assistant" or modes.get(mode, 0) >= samples):
            continue  # plain-text rows have no template; TRL checks those itself
        modes[mode] = modes.get(mode, 0) + 1
        prompt = tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True, **kwargs)
        full = tokenizer.apply_chat_template(prompt_turns + reply, tokenize=False, **kwargs)
        if not full.startswith(prompt):
            # the template writes a reply's context otherwise than the prompt it answers (ERNIE-4.5-VL's own drops its
            # non-thinking prompt's empty think block): the same skew, in the text itself
            rewritten += 1
            cut = len(os.path.commonprefix([prompt, full]))
            rewrite = rewrite or (prompt[cut:], full[cut:cut + 24], mode)
            continue
        checked += 1
        if is_processor(tokenizer):
            continue  # image rows: the vision collator tokenizes prompt and reply apart, as generation does
        alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        joint = tokenizer(full, add_special_tokens=False)["input_ids"]
        if joint[:len(alone)] != alone:
            mismatched += 1
            cut = next((i for i, (a, b) in enumerate(zip(alone, joint)) if a != b), len(joint))
            example = example or (tokenizer.convert_ids_to_tokens(alone[cut:]),
                                  tokenizer.convert_ids_to_tokens(joint[cut:len(alone) + 1]), mode)
    if mismatched:
        logger.warning(
            "pre-flight: %s: in %d of %d rows checked, the prompt ends in tokens %s when rendered for generation but "
            "as %s when the reply follows it in training (enable_thinking=%s): the model learns each reply after a "
            "context it will not see when it answers. End the chat template's generation prompt on a token boundary "
            "(e.g. one newline after an empty <think></think> block, as posttrain's chatml template does).",
            name, mismatched, checked, *example)
    found = {"prompt_boundary": f"{mismatched} of {checked} rows differ" if mismatched else f"ok ({checked} rows)"}
    if rewritten:
        logger.warning(
            "pre-flight: %s: in %d of %d rows the chat template renders the prompt for generation ending %r, but "
            "before the reply in training as %r (enable_thinking=%s): the model learns each reply after a context it "
            "will not see when it answers. Use a chat template that renders both the same way (base.chat_template).",
            name, rewritten, rewritten + checked, *rewrite)
        found["prompt_rewritten"] = f"{rewritten} of {rewritten + checked} rows"
    return found


def end_of_turn_ids(tokenizer, chat_template: str | None = None) -> set[int]:
    """The tokens that end a reply: EOS (plain-text rows get it appended), and the special token the chat template
    closes an assistant turn with inside its `{% generation %}` markers, e.g. ERNIE's <|end_of_sentence|> where EOS is
    </s>. A template whose marked span ends on content adds nothing, so the gate still fails on it."""
    from trl.chat_template_utils import has_generation_markers

    ids = {tokenizer.eos_token_id} - {None}
    template = chat_template or tokenizer.chat_template
    if not isinstance(template, str) or not has_generation_markers(template):
        return ids
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}]
    try:
        out = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            chat_template=template)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: EOS only
        return ids
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    last = next((t for t in reversed(masked) if tokenizer.decode([t]).strip()), None)
    return ids | ({last} if last in set(tokenizer.get_added_vocab().values()) else set())


def reply_cut(labels: list[int], end_of_turn: set[int]) -> bool:
    """Whether a row cut at its last token was cut inside a reply: the trained span it ends on has no end-of-turn
    token. The last span only, so an earlier complete turn of a multi-turn row does not hide a cut final reply."""
    start = len(labels)
    while start and labels[start - 1] != -100:
        start -= 1
    return start < len(labels) and not end_of_turn.intersection(labels[start:])


def warn_cut_replies(name: str, cut: int, rows: int, max_length: int, packing: bool = False,
                     side: str | None = None, heldout: bool = False) -> None:
    """The warning for `cut` of `rows` rows whose reply `max_length` cuts before its end-of-turn token (`reply_cut`):
    text rows as TRL tokenized them (`sft.report_cut_replies`, `count_cut_pairs`), image rows as its collator cuts
    them (`check_image_tokens`). `side`: DPO's "chosen" or "rejected" reply of `rows` pairs; `heldout`: pairs that
    are scored, not trained."""
    if not cut:
        return
    # not truncation_mode: keep_end, which TRL 1.16 deprecates for SFT
    effect = "the held-out preference accuracy scores them cut" if heldout else \
        "DPO weighs rejected replies that do not stop" if side == "rejected" else \
        "the model learns replies that do not stop"
    logger.warning("pre-flight: %s: %d of %d %s are cut by max_length=%s before their %sreply's end-of-turn token, so "
                   "%s; raise max_length%s to keep it", name, cut, rows, "pairs" if side else "rows", max_length,
                   f"{side} " if side else "", effect,
                   " (or packing_strategy: bfd_split, which carries the rest over)" if packing else "")


def count_cut_pairs(dataset, max_length: int | None, truncation_mode: str, end_of_turn: set[int], name: str,
                    heldout: bool = False) -> dict:
    """DPO's text pairs whose chosen or rejected reply `max_length` cuts before its end-of-turn token (`reply_cut`),
    as TRL's collator cuts `prompt_ids` + `chosen_ids` (and + `rejected_ids`) to `max_length`, each side on its own;
    where `trainers.dpo_trainer` masks tool results, its masks tell the reply's own tokens. A cut chosen reply
    teaches, through DPO's sigmoid and its `sft` term, replies that do not stop. A warning per side, and `pairs_cut`
    in the pre-flight record; `heldout` pairs (TRL's eval dataset) are scored cut, and warned about as such."""
    columns = dataset.column_names or []
    if max_length is None or "prompt_ids" not in columns:
        return {}
    kept = slice(-max_length, None) if truncation_mode == "keep_end" else slice(max_length)  # TRL's two modes
    counts = {"chosen": 0, "rejected": 0}
    read = [c for c in columns if c in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask")]
    for row in dataset.select_columns(read):
        for side in counts:
            prompt, ids = row["prompt_ids"], row[f"{side}_ids"]
            if len(prompt) + len(ids) > max_length:
                mask = row.get(f"{side}_mask") or [1] * len(ids)
                labels = [-100] * len(prompt) + [t if m else -100 for t, m in zip(ids, mask)]
                counts[side] += reply_cut(labels[kept], end_of_turn)
    for side, cut in counts.items():
        warn_cut_replies(name, cut, len(dataset), max_length, side=side, heldout=heldout)
    return {"pairs_cut": counts}


def check_collated_labels(trainer, eos_token_id: int | set[int], samples: int = 8) -> dict:
    """Collate the first rows exactly as training will; each must have labels, and its end-of-turn token labelled
    (`eos_token_id`: the id, or the ids any of which ends a turn: `end_of_turn_ids`)."""
    import torch

    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    dataset = trainer.train_dataset
    rows = [dataset[i] for i in range(min(samples, len(dataset)))]
    batch = trainer.data_collator(rows)
    labels = batch["labels"]
    trained = labels != -100
    for index in range(labels.shape[0]):
        if not trained[index].any():
            raise UserError(
                f"pre-flight: training {row_name(index)} has no trained tokens (empty assistant mask or everything "
                "truncated by max_length); check the chat template's {% generation %} markers and max_length."
            )
        if not torch.isin(labels[index], torch.tensor(sorted(eos_ids))).any():
            raise UserError(
                f"pre-flight: training {row_name(index)}: the end-of-turn token "
                f"({' or '.join(f'id {i}' for i in sorted(eos_ids))}) is never in the labels, "
                "so the model would never learn to stop. Common causes: pad token == EOS with padding masked by id, "
                "a template that puts the end-of-turn token outside {% generation %}, or max_length cutting it off."
            )
    return {
        "rows_checked": int(labels.shape[0]),
        "trained_token_fraction": float(trained.float().mean()),
        "eos_labelled": True,
        "max_tokens": int(torch.as_tensor(batch["input_ids"]).shape[1]),
    }


def check_preference_pairs(dataset, name: str, tokenizer=None, max_length: int | None = None,
                           allow_skip: bool = False, truncation_mode: str = "keep_start"):
    """Bad pairs are an error naming the row, or a counted skip when allowed: an empty side, chosen == rejected (tool
    calls included), or a prompt so long that truncation to `max_length` would leave no reply token to learn from
    (`keep_start` truncation, TRL's default; `keep_end` keeps the reply). Returns the kept pairs and the indices of the
    skipped ones."""
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise UserError(f"pre-flight: {name}: preference pairs need the columns prompt, chosen, rejected; missing: "
                        f"{', '.join(missing)} (has: {', '.join(dataset.column_names)})")
    from tqdm.auto import tqdm

    bad = []
    # ~1,000 pairs a second with a tokenizer (three renderings and tokenizations a pair): minutes for a large set.
    # Without the images: stored ones would all be decoded, and a broken one raise PIL's error naming no row (the
    # stages check images, naming the row, in `vision.decode_images`)
    text = dataset.remove_columns([c for c in ("images",) if c in dataset.column_names])
    rows = tqdm(text, desc=f"pre-flight: {name}", disable=len(dataset) < 10_000, leave=False)
    for index, row in enumerate(rows):
        chosen, rejected = _reply(row["chosen"]), _reply(row["rejected"])
        reason = None
        if row["prompt"] is None or chosen is None or rejected is None:
            column = "prompt" if row["prompt"] is None else "chosen" if chosen is None else "rejected"
            reason = f'"{column}" is not a reply (null, or neither text nor a list of messages)'
        elif isinstance(row["prompt"], list) and (ended := prompt_end(row["prompt"])):
            reason = ended
        elif not chosen or not rejected:
            reason = f"\"{'chosen' if not chosen else 'rejected'}\" is empty; expected a non-empty reply"
        elif chosen == rejected:
            reason = "chosen == rejected; expected two different replies"
        elif said := non_thinking_reasoning(row, {"chosen": row["chosen"], "rejected": row["rejected"]}):
            reason = said
        elif tokenizer is not None and max_length and truncation_mode == "keep_start":
            # TRL tokenizes a text prompt with the tokenizer's special tokens (Llama-3's and Gemma's BOS): one token
            # more of `max_length` than the text; a rendered conversation has its own
            length = len(tokenizer(prompt_text(tokenizer, row),
                                   add_special_tokens=isinstance(row["prompt"], str))["input_ids"])
            if length >= max_length:
                reason = (f"the prompt is {length} tokens, so max_length={max_length} would cut every reply token; "
                          "raise max_length or shorten the prompt")
            elif _same_once_cut(tokenizer, row, max_length - length):
                # TRL would train on two identical sequences: a loss stuck at log 2, no gradient (UPO drops such pairs)
                reason = (f"chosen and rejected are the same in the {max_length - length} reply tokens "
                          f"max_length={max_length} leaves after the prompt; raise max_length")
        if reason:
            if not allow_skip:
                raise UserError(f"pre-flight: {name} {row_name(index)}: {reason} (set skip_bad_rows: true to skip "
                                "such rows)")
            bad.append(index)
    if bad:
        dataset = dataset.select(kept_rows(len(dataset), bad))
    return dataset, bad


def prompt_end(prompt: list) -> str | None:
    """Why a conversational prompt is not one a reply answers, or None. The template opens the assistant's turn after
    the prompt's last: after an assistant turn the reply would be trained as a second reply in a row, and after a
    system turn as an answer to nothing asked."""
    last = prompt[-1].get("role") if prompt and isinstance(prompt[-1], dict) else None
    if last in ("user", "tool"):
        return None
    found = f"ends on a turn of role {last!r}" if prompt else "has no turns"
    return (f"the prompt {found}; expected its last turn to be the user's (or a tool result) that the reply answers "
            "(an assistant turn that is part of the reply belongs in chosen and rejected)")


def kept_rows(count: int, skipped: list[int]) -> list[int]:
    """The source row of each row left after `skipped` were dropped from `count` rows, so later checks name the row a
    user finds in the file."""
    gone = set(skipped)
    return [index for index in range(count) if index not in gone]


def _same_once_cut(tokenizer, row: dict, budget: int) -> bool:
    """Whether a pair's replies, as TRL tokenizes them (`data.preference_texts`), agree in their first `budget`
    tokens."""
    eos = text_tokenizer(tokenizer).eos_token
    _, chosen, rejected = preference_texts(tokenizer, row, eos)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:budget] for text in (chosen, rejected)]
    return ids[0] == ids[1]


def _reply(completion) -> str | None:
    try:
        return reply_text(completion).strip()
    except TypeError:
        return None


def check_prompt_rows(dataset, name: str) -> None:
    """RL prompts are in a `prompt` column (GRPOTrainer reads no other), there are some, and each conversation ends
    on the turn the model answers (`prompt_end`)."""
    if "prompt" not in dataset.column_names:
        raise UserError(f"pre-flight: {name}: UPO prompts need a `prompt` column (text, or a list of {{role, content}} "
                        f"messages) next to what the rewards read (e.g. `answer`); it has: "
                        f"{', '.join(dataset.column_names) or 'no columns'}")
    check_no_row_tools(dataset, name)
    if len(dataset) == 0:
        raise UserError(f"pre-flight: {name}: no prompts to train on")
    for index, prompt in enumerate(dataset["prompt"]):
        if isinstance(prompt, list) and (problem := prompt_end(prompt)):
            raise UserError(f"pre-flight: {name} {row_name(index)}: {problem}")


def check_no_row_tools(dataset, name: str) -> None:
    """No row has `tools`: UPO renders its RL prompts, and its offline pairs' prompts as it renders those, without a
    per-row `tools` column, as TRL's GRPO does; the schemas belong in the prompt (README: Tool calling)."""
    tools = dataset["tools"] if "tools" in dataset.column_names else []
    index = next((i for i, value in enumerate(tools) if value), None)
    if index is not None:
        raise UserError(f"pre-flight: {name} {row_name(index)}: its `tools` would be left out: TRL's GRPO renders every "
                        "prompt without a per-row `tools` column, so the model would be asked to call tools it is "
                        "never shown. Put the schemas in each prompt's system turn, and drop the column")


def check_reward_references(dataset, rewards: dict | None, name: str, allow_skip: bool = False):
    """Every reference column a reward reads (`rewards.REQUIRED_COLUMNS`) exists and is filled in every prompt row: a
    prompt whose `answer` is null or blank has nothing to be right against, so the correctness rewards return None
    (not applicable) for all its completions, and it spends generations that train on the other rewards alone, or on
    nothing. A missing column is always an error; empty rows are an error naming the row, or a counted skip when
    allowed. A reference that is a worked solution (`answers.rationale_problem`: GSM8K's `#### 72`, a long text
    around a `\\boxed{}`) is always an error: it is the whole column, not a row, that needs the answer taken out."""
    from .answers import rationale_problem
    from .rewards import REQUIRED_COLUMNS

    needed = {}
    for reward in rewards or {}:
        if reward in REQUIRED_COLUMNS:
            needed.setdefault(REQUIRED_COLUMNS[reward], []).append(reward)
    bad = set()
    for column, users in needed.items():
        if column not in dataset.column_names:
            raise UserError(f"pre-flight: {name}: reward(s) {', '.join(users)} need a '{column}' column; the rows "
                            f"have: {', '.join(dataset.column_names)}")
        for index, value in enumerate(dataset[column]):
            if value is not None and (problem := rationale_problem(str(value))):
                raise UserError(f"pre-flight: {name} {row_name(index)}: '{column}' {problem}, so reward "
                                f"'{users[0]}' would compare each reply with the whole solution; expected the final "
                                "answer alone. `posttrain data build_prompt_set` takes it out (GSM8K's `question`/"
                                "`answer`, MATH's `problem`/`solution`; data_prep/README.md)")
            if value is None or not str(value).strip():
                if not allow_skip:
                    raise UserError(f"pre-flight: {name} {row_name(index)}: '{column}' is empty, so reward "
                                    f"'{users[0]}' could not score any completion of this prompt (no reward, no "
                                    "gradient); fill it or drop the row (set skip_bad_rows: true to skip such rows)")
                bad.add(index)
    if bad:
        dataset = dataset.select(sorted(set(range(len(dataset))) - bad))
    return dataset, len(bad)


# ----------------------------------------------------------------------------------------------------------------------
# Vision: images vs placeholders, image tokens vs max_length, processor vs model
# ----------------------------------------------------------------------------------------------------------------------
def check_image_slots(dataset, name: str) -> None:
    """Every row has one image per image placeholder in its conversation; names the row.

    Rows whose messages are all plain strings have no placeholders: TRL puts their images at the start of the first
    user turn, so only those may have images and no placeholder."""
    columns = [c for c in ("messages", "prompt", "completion", "chosen", "rejected") if c in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(columns + ["images"]).to_list()):
        images = len(row["images"] or [])
        contents = [m.get("content") for c in columns if isinstance(row[c], list) for m in row[c]]
        slots = sum(1 for content in contents if isinstance(content, list)
                    for part in content if isinstance(part, dict) and part.get("type") == "image")
        if slots != images and (slots or any(isinstance(content, list) for content in contents)):
            raise UserError(f"pre-flight: {name} {row_name(index)}: {images} image(s) for {slots} image "
                            "placeholder(s) in the conversation; expected one {\"type\": \"image\"} part per image")
        markers = sum(content.count("<image>") for content in contents if isinstance(content, str))
        if images and markers:  # LLaMA-Factory's text markers: TRL adds its own placeholders, and the counts clash
            raise UserError(f"pre-flight: {name} {row_name(index)}: {markers} literal '<image>' marker(s) in its text; "
                            "expected {\"type\": \"image\"} parts (TRL's format). `posttrain data build_sft_set` / "
                            "`build_preference_set` turn the markers into parts")


def check_image_tokens(trainer, image_token_id: int, chunk: int = 16, limit: int = 2048,
                       rows: list[int] | None = None, end_of_turn: set[int] | None = None,
                       name: str = "training set") -> dict:
    """Collate the rows as training will, with and without `max_length`: truncation must not cut image tokens.

    Cut image tokens are what makes a VLM fail mid-training with "Image features and image tokens do not match" (the
    image's features are all there, its placeholder tokens are not). Here it is an error before the first step, with
    the length that would fit. Every row up to `limit`, not a sample of the first: one long row (many images, a long
    question) anywhere in the set stops training when its batch comes. Collating costs a pass of the processor (no
    model forward), some 20 ms an image for a real one: beyond `limit` rows the record says how many were checked.
    `rows`: each training row's row in the source (`kept_rows`), where pre-flight skipped some. With `end_of_turn`
    (`end_of_turn_ids`), the rows whose reply the cut ends before its end-of-turn token are counted and warned
    about as text rows are (`warn_cut_replies`, naming the set `name`): `rows_cut`, or for DPO's pairs `pairs_cut`
    per side."""
    collator = trainer.data_collator
    dataset = trainer.train_dataset
    checked = min(len(dataset), limit)
    tokens, untrained, cut = 0, [], {}
    for start in range(0, checked, chunk):
        indices = range(start, min(start + chunk, checked))
        kept, empty, replies_cut = _image_tokens_kept(collator, [dataset[i] for i in indices],
                                                      [rows[i] if rows else i for i in indices], image_token_id,
                                                      end_of_turn)
        tokens += kept
        untrained += [rows[start + i] if rows else start + i for i in empty]
        cut = {key: cut.get(key, 0) + count for key, count in replies_cut.items()}
    record = {"image_tokens": tokens}
    if checked < len(dataset):
        record["image_rows_checked"] = f"the first {checked} of {len(dataset)}"
    if untrained:
        # TRL drops such text rows (SFT) or pre-flight stops on them (DPO); image rows it cuts in its collator, batch
        # by batch, and trains them as they are
        logger.warning("pre-flight: %d of %d image rows checked train nothing within max_length=%s (rows %s%s, "
                       "counting from 1): each reply is cut away entirely, or a pair's replies are the same once cut "
                       "(its DPO loss stays at log 2, with no gradient); raise max_length (or shorten their prompts) "
                       "to train on them", len(untrained), checked, collator.max_length,
                       ", ".join(str(i + 1) for i in untrained[:3]), ", ..." if len(untrained) > 3 else "")
    if collator.max_length is None:
        return record
    record.update(max_length=collator.max_length, rows_untrained=len(untrained))
    if end_of_turn and "rows" in cut:
        warn_cut_replies(name, cut["rows"], checked, collator.max_length)
        record["rows_cut"] = cut["rows"]
    elif end_of_turn and cut:
        for side, count in cut.items():
            warn_cut_replies(name, count, checked, collator.max_length, side=side)
        record["pairs_cut"] = cut
    return record


def _image_tokens_kept(collator, rows: list, sources: list[int], image_token_id: int,
                       end_of_turn: set[int] | None = None) -> tuple[int, list[int], dict]:
    """The image tokens of `rows` (source rows `sources`), after checking that `max_length` keeps them all, the
    indices of the rows that train nothing once cut (`_untrained`), and how many replies the cut ends before their
    end-of-turn token (`_replies_cut`)."""
    import copy
    import dataclasses

    max_length = collator.max_length
    full = dataclasses.replace(collator, max_length=None)(copy.deepcopy(rows))
    if max_length is None:
        return int((full["input_ids"] == image_token_id).sum()), [], {}
    cut = collator(copy.deepcopy(rows))
    for index in range(len(rows)):
        want = int((full["input_ids"][index] == image_token_id).sum())
        kept = int((cut["input_ids"][index] == image_token_id).sum())
        if kept != want:
            last = int((full["input_ids"][index] == image_token_id).nonzero().max()) + 1
            raise UserError(
                f"pre-flight: training {row_name(sources[index])}: max_length={max_length} cuts {want - kept} of its "
                f"{want} image tokens (they run to position {last}), so training would fail with \"Image features and "
                f"image tokens do not match\". Raise max_length to at least {int(full['attention_mask'][index].sum())} "
                "(this row's full length), or use smaller images (fewer image tokens)."
            )
    tokens = int((full["input_ids"] == image_token_id).sum())
    return tokens, _untrained(cut, len(rows)), _replies_cut(full, cut, end_of_turn)


def _replies_cut(full: dict, cut: dict, end_of_turn: set[int] | None) -> dict:
    """How many rows of a collated batch `max_length` shortened (`cut`, against `full`) inside their last reply
    (`reply_cut`): SFT's `{"rows": n}` from its labels; DPO's per side from its `completion_mask` (chosen rows, then
    rejected); `{}` without `end_of_turn`. Right-padded, as TRL's collators pad them."""
    if not end_of_turn or "attention_mask" not in cut or not {"labels", "completion_mask"} & set(cut):
        return {}
    labels = cut["labels"] if "labels" in cut else cut["input_ids"].masked_fill(cut["completion_mask"] == 0, -100)
    lengths, full_lengths = cut["attention_mask"].sum(-1).tolist(), full["attention_mask"].sum(-1).tolist()
    rows = [length < whole and reply_cut(labels[index][:length].tolist(), end_of_turn)
            for index, (length, whole) in enumerate(zip(lengths, full_lengths))]
    if "labels" in cut:
        return {"rows": sum(rows)}
    return {"chosen": sum(rows[:len(rows) // 2]), "rejected": sum(rows[len(rows) // 2:])}


def _untrained(batch: dict, count: int) -> list[int]:
    """The rows of a collated batch of `count` rows that train nothing: SFT's with every label masked; DPO's (chosen
    rows, then rejected) with no scored reply token on a side, or the same scored tokens on both."""
    if "labels" in batch:
        return [i for i in range(count) if not (batch["labels"][i] != -100).any()]
    if "completion_mask" not in batch:
        return []
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    chosen, rejected = [ids[i][mask[i]] for i in range(count)], [ids[count + i][mask[count + i]] for i in range(count)]
    return [i for i in range(count) if not len(chosen[i]) or not len(rejected[i]) or chosen[i].equal(rejected[i])]


def check_processor_matches_model(processor, model, batch: dict) -> None:
    """The processor writes the image token the model replaces with image features, its vocabulary fits the model,
    every per-token field of one collated batch (`*token_type_ids`) covers all its tokens, and the batch runs through
    the model: a mismatched pair (another model's processor, another patch size) or a collator that leaves a field at
    the prompt's length fails here, in words, instead of inside the first training step."""
    import torch

    config = model.config
    if processor.image_token_id != config.image_token_id:
        raise UserError(f"pre-flight: the processor's image token {processor.image_token!r} (id "
                        f"{processor.image_token_id}) is not the model's (image_token_id {config.image_token_id}): "
                        "the processor belongs to another model. Load both from the same folder.")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(processor.tokenizer) > rows:
        raise UserError(f"pre-flight: the processor's tokenizer has {len(processor.tokenizer)} tokens but the model "
                        f"embeds only {rows}: they do not belong together")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "completion_mask", "assistant_masks")}
    length = inputs["input_ids"].shape[-1] if "input_ids" in inputs else None
    for key, value in inputs.items():
        if key.endswith("token_type_ids") and length is not None and value.shape[-1] != length:
            raise UserError(f"pre-flight: the collated batch's `{key}` covers {value.shape[-1]} positions of "
                            f"{length} tokens: the trainer's collator does not extend this per-token field over the "
                            "reply (TRL extends token_type_ids and mm_token_type_ids, posttrain.moe_routing "
                            "ERNIE-4.5-VL's moe_mm_token_type_ids), so the model would fail or misread the reply. "
                            "This model's image rows need a collator that lays the field out over the whole sequence.")
    try:
        with torch.no_grad():
            model(**inputs)
    except ValueError as exc:
        if "do not match" not in str(exc):
            raise
        raise UserError(f"pre-flight: the processor and the model disagree on how many tokens an image takes ({exc}). "
                        "Common causes: a processor from another model, a changed patch size or image size.") from exc
