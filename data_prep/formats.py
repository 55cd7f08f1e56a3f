"""Input formats: which one a row is in, and one converter per format to the TRL columns our stages read.

Every converter takes a raw row (a dict) and returns a record of one *kind*:
- `sft`: `messages` (+ `tools`, `images`, `thinking`);
- `preference`: conversational `prompt`, `chosen`, `rejected` (+ `images`, `thinking`);
- `unpaired`: `prompt`, `completion`, `label` (KTO) (+ `tools`, `images`, `thinking`);
- `rl`: `prompt`, `answer`, `domain` (+ `images`, `thinking`): RL prompts (`prompt_formats`: TRL's, GSM8K's, MATH's).
Vision rows (`vqa`, `erniekit_vl`, or any sft/preference/rl row with `images`) carry image file paths; with
`Options.embedded_images` (the data jobs set it) an image may also be bytes, as a `datasets.Image` column holds them.
Keys a format does not use are ignored (ids, metadata); problems raise `RowError` naming the field.
LLaMA-Factory's formats live in `llamafactory`, the record builders every converter shares in `records`, and
`dataset_info.json` registries in `registry` (which renames a registered file's keys before conversion).
"""

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from posttrain.errors import UserError

from .images import LITERAL_IMAGE_NOTE, has_literal_image_marker
from .llamafactory import (
    alpaca_history,
    alpaca_prompt,
    drop_untrained_tail,
    from_alpaca,
    from_kto_conversation,
    from_pairwise_messages,
    from_sharegpt,
    from_sharegpt_preference,
    typed_parts_as_text,
)
from .messages import (
    UNOPENED_THINK_NOTE,
    RowError,
    RowSkip,
    check_messages,
    has_unopened_think,
    require_list,
    require_str,
    require_str_list,
)
from .prompt_formats import detect_prompt, from_gsm8k, from_math, from_rl
from .readers import RawRow, read_rows
from .records import (
    Options,
    check_no_row_reasoning,
    conversations_prompt,
    desirability_label,
    holds_prompt,
    preference_record,
    prompt_messages,
    reply_messages,
    sft_record,
    unpaired_record,
)

__all__ = ["FORMATS", "Converted", "Options", "convert_rows", "detect", "resolve_format"]


def detect(row: dict) -> str | None:
    """The format of one row from its keys, or None."""
    keys = set(row)
    if "chosen_messages" in keys or "rejected_messages" in keys:
        return "pairwise_messages"
    if ("messages" in keys or "conversations" in keys) and desirability_label(row.get("label")) is not None:
        return "kto_conversation"  # a preference label: never SFT data
    if "messages" in keys and {"chosen", "rejected"} <= keys:
        return "preference"  # UltraFeedback-binarized: its `messages` is the chosen conversation again
    if "messages" in keys:
        return detect_prompt(row) or "messages"  # a conversation ending on a user turn, with a reference answer
    if "conversations" in keys:
        return "sharegpt_preference" if "chosen" in keys or "rejected" in keys else "sharegpt"
    if "text_info" in keys or "image_info" in keys:
        return "erniekit_vl"
    if {"question", "answer"} <= keys and ("image" in keys or "images" in keys):
        return "vqa"
    if "src" in keys and ("response" in keys or "sort" in keys):
        return "erniekit_dpo"
    if "src" in keys or "tgt" in keys:
        return "erniekit_sft"
    if "completions" in keys:
        return "rated"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "instruction" in keys:
        return "alpaca"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if prompt_format := detect_prompt(row):  # before prompt_completion: RL prompt sets may carry a reference completion
        return prompt_format
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Instruction data -> messages
# ----------------------------------------------------------------------------------------------------------------------
def from_messages(row: dict, opts: Options) -> dict:
    """OpenAI/TRL `messages: [{role, content}]`, with `reasoning_content`, `tool_calls` and `tools` when present; also
    LLaMA-Factory's newer typed `{"type", "value"}` parts with a per-message `loss_weight`."""
    check_no_row_reasoning(row)
    messages = row.get("messages")
    if isinstance(messages, list):
        messages = typed_parts_as_text(drop_untrained_tail(messages, "messages"), "messages")
    messages, thinking = check_messages(messages, "messages")
    return sft_record(row, messages, thinking, opts, row.get("system"))


def _interleave(src: list[str], tgt: list[str]) -> list[dict]:
    messages = []
    for i, query in enumerate(src):
        messages.append({"role": "user", "content": query})
        if i < len(tgt):
            messages.append({"role": "assistant", "content": tgt[i]})
    return messages


def from_erniekit_sft(row: dict, opts: Options) -> dict:
    """ERNIEKit SFT `{system?, src: [...], tgt: [...], label?: [0/1...]}`.

    TRL has no per-turn loss switch, so turns after the last `label: 1` turn are dropped (they train nothing); a
    `label: 0` turn before it stays as context and is trained like the others.
    """
    check_no_row_reasoning(row)
    src = require_str_list(row.get("src"), "src", "a non-empty user turn")
    tgt = require_str_list(row.get("tgt"), "tgt", "a non-empty assistant reply")
    if len(tgt) != len(src):
        raise RowError("tgt", f"has {len(tgt)} turn(s) for {len(src)} in \"src\"", "one reply per user turn")
    label = row.get("label")
    if label is not None:
        label = require_list(label, "label", "a list of 0/1, one per turn")
        if len(label) != len(src) or any(v not in (0, 1, True, False) for v in label):
            raise RowError("label", f"is {label!r}"[:80], f"{len(src)} values of 0 or 1, one per turn")
        if not any(label):
            raise RowError("label", "marks no turn for training", "at least one 1")
        keep = max(i for i, v in enumerate(label) if v) + 1
        src, tgt = src[:keep], tgt[:keep]
    messages, thinking = check_messages(_interleave(src, tgt), "src/tgt")
    return sft_record(row, messages, thinking, opts, row.get("system"))


def from_vqa(row: dict, opts: Options) -> dict:
    """VQA rows: `image` (a path, or `{"bytes", "path"}` as `datasets.Image` stores it) or `images`, a `question`
    and its `answer` (optionally `reasoning`, which becomes the <think> block). Without `<image>` markers in the
    question, the images come first in the user turn."""
    question = require_str(row.get("question"), "question", "the question about the image")
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = require_str(answer, "answer", "the reference answer")
    images = row.get("images", row.get("image"))
    if images is None or images == []:
        raise RowError("image", "is missing", "an image file path (or `images`: a list of them)")
    count = 1 if isinstance(images, (str, dict)) else len(images) if isinstance(images, list) else 0
    content = question if "<image>" in question else "<image>" * count + question
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": answer, "reasoning_content": row.get("reasoning")}]
    messages, thinking = check_messages(messages, "question/answer")
    return sft_record({**row, "images": images}, messages, thinking, opts)


ERNIEKIT_TAGS = {"mask": "user", "no_mask": "assistant"}


def from_erniekit_vl(row: dict, opts: Options) -> dict:
    """ERNIEKit VL SFT `{"image_info": [{"image_url", "matched_text_index"}], "text_info": [{"text", "tag"}]}`.

    `tag: mask` texts are user turns (not trained), `no_mask` texts the assistant's; consecutive texts with the same
    tag form one turn. An image sits right before the text its `matched_text_index` points at (default 0), and must
    be in a user turn, as ERNIEKit requires."""
    texts = require_list(row.get("text_info"), "text_info", 'a list of {"text", "tag": "mask"|"no_mask"}')
    placed: dict[int, list[str]] = {}
    image_info = require_list(row.get("image_info") or [], "image_info", "a list of {image_url, matched_text_index}",
                              allow_empty=True)
    for i, image in enumerate(image_info):
        if not isinstance(image, dict):
            raise RowError(f"image_info[{i}]", f"is a {type(image).__name__}", "an {image_url, matched_text_index}")
        url = require_str(image.get("image_url"), f"image_info[{i}].image_url", "an image file path")
        index = image.get("matched_text_index", 0)
        if not isinstance(index, int) or not 0 <= index < len(texts):
            raise RowError(f"image_info[{i}].matched_text_index", f"is {index!r}",
                           f"the index of a text_info entry (0..{len(texts) - 1})")
        placed.setdefault(index, []).append(url)
    messages, images = [], []
    for i, item in enumerate(texts):
        if not isinstance(item, dict) or item.get("tag") not in ERNIEKIT_TAGS:
            raise RowError(f"text_info[{i}]", f"is {item!r}"[:80], '{"text": ..., "tag": "mask" or "no_mask"}')
        role = ERNIEKIT_TAGS[item["tag"]]
        text = require_str(item.get("text"), f"text_info[{i}].text", "a string", allow_empty=True)
        if i in placed and role != "user":
            raise RowError(f"image_info (matched_text_index {i})", "points at a no_mask (assistant) text",
                           "images in mask (user) texts, as ERNIEKit requires")
        parts = [{"type": "image"} for _ in placed.get(i, [])] + ([{"type": "text", "text": text}] if text else [])
        images += placed.get(i, [])
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += parts
        else:
            messages.append({"role": role, "content": parts})
    for message in messages:  # replies are plain text: <think> blocks and thinking modes are read from strings
        if message["role"] == "assistant":
            message["content"] = "".join(part["text"] for part in message["content"])
    messages, thinking = check_messages(messages, "text_info")
    return sft_record({**row, "images": images}, messages, thinking, opts)


def from_prompt_completion(row: dict, opts: Options) -> dict:
    """TRL prompt-completion (`prompt`, `completion`: strings or message lists), joined into one conversation."""
    check_no_row_reasoning(row)
    prompt = prompt_messages(row, "prompt")
    completion, thinking = reply_messages(row.get("completion"), "completion", prompt)
    return sft_record(row, prompt + completion, thinking, opts)


# ----------------------------------------------------------------------------------------------------------------------
# Preference data -> prompt / chosen / rejected
# ----------------------------------------------------------------------------------------------------------------------
def from_preference(row: dict, opts: Options) -> dict:
    """TRL preference rows: standard (strings) or conversational, explicit `prompt` or implicit (shared prefix)."""
    check_no_row_reasoning(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "prompt" not in row and "instruction" in row:  # LLaMA-Factory's alpaca-style preference rows
        prompt = alpaca_prompt_messages(row)
    elif holds_prompt(row, chosen, rejected):
        prompt, chosen, rejected = conversations_prompt(row, chosen, rejected)
    else:
        prompt = prompt_messages(row, "prompt")
    chosen = reply_messages(chosen, "chosen", prompt)
    rejected = reply_messages(rejected, "rejected", prompt)
    return preference_record(row, prompt, chosen, rejected, opts)


def alpaca_prompt_messages(row: dict) -> list[dict]:
    """An Alpaca row's prompt as messages: `system`, the `history` exchanges, then `instruction` and `input`."""
    messages = alpaca_history(row) + [{"role": "user", "content": alpaca_prompt(row)}]
    system = row.get("system")
    if system is not None and require_str(system, "system", "a string", allow_empty=True).strip():
        messages.insert(0, {"role": "system", "content": system})
    return check_messages(messages, "conversation", ends_with="user")[0]


def from_erniekit_dpo(row: dict, opts: Options) -> dict:
    """ERNIEKit DPO `{system?, src: [q1..qn], tgt: [a1..a(n-1)], response: [[A], [B]], sort: [1, 0]}`."""
    src = require_str_list(row.get("src"), "src", "a non-empty user turn")
    tgt = require_str_list(row.get("tgt") or [], "tgt", "a non-empty assistant reply") if row.get("tgt") else []
    if len(tgt) != len(src) - 1:
        raise RowError("tgt", f"has {len(tgt)} turn(s) for {len(src)} in \"src\"",
                       f"{len(src) - 1} (the last user turn is answered by \"response\")")
    responses = require_list(row.get("response"), "response", "a list of candidate replies, e.g. [[A], [B]]")
    texts = []
    for i, response in enumerate(responses):
        if isinstance(response, list) and len(response) == 1:
            response = response[0]
        texts.append(require_str(response, f"response[{i}]", "a non-empty reply (a string or a one-string list)"))
    if len(texts) < 2:
        raise RowError("response", f"has {len(texts)} candidate(s)", "at least two")
    sort = require_list(row.get("sort"), "sort", "one number per response, higher is better")
    if len(sort) != len(texts) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sort):
        raise RowError("sort", f"is {sort!r} for {len(texts)} responses"[:100], f"{len(texts)} numbers, higher wins")
    best, worst = max(range(len(sort)), key=sort.__getitem__), min(range(len(sort)), key=sort.__getitem__)
    if sort[best] == sort[worst]:
        raise RowError("sort", f"gives every response the same rank ({sort[best]})", "a higher value for the winner")
    prompt = check_messages(_interleave(src, tgt), "src/tgt", ends_with="user")[0]
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        prompt.insert(0, {"role": "system", "content": system})
    chosen = reply_messages(texts[best], f"response[{best}]", prompt)
    rejected = reply_messages(texts[worst], f"response[{worst}]", prompt)
    return preference_record(row, prompt, chosen, rejected, opts)


_RESPONSE_KEYS, _SCORE_KEYS = ("response", "text", "completion", "output"), ("score", "overall_score", "rating")


def from_rated(row: dict, opts: Options) -> dict:
    """UltraFeedback-style `prompt`/`instruction` + `completions: [{response, score}]`: best vs. worst, if far apart."""
    prompt = prompt_messages(row, "prompt" if "prompt" in row else "instruction")
    completions = require_list(row.get("completions"), "completions", "a list of {response, score}")
    scored = []
    for i, item in enumerate(completions):
        if not isinstance(item, dict):
            raise RowError(f"completions[{i}]", f"is a {type(item).__name__}", "a {response, score} object")
        text = next((item[k] for k in _RESPONSE_KEYS if k in item), None)
        key = next((k for k in _SCORE_KEYS if item.get(k) is not None), "score")
        score = item.get(key)
        require_str(text, f"completions[{i}].response", "a non-empty reply")
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise RowError(f"completions[{i}].{key}", f"is {score!r}", "a number")
        if not math.isfinite(score):  # NaN compares false both ways: best and worst would come out the same reply
            raise RowError(f"completions[{i}].{key}", f"is {score}", "a finite number")
        scored.append((score, i, text))
    if len(scored) < 2:
        raise RowError("completions", f"has {len(scored)} rated response(s)", "at least two")
    (best, b, chosen), (worst, w, rejected) = max(scored), min(scored)
    if best - worst < opts.min_score_margin:
        raise RowSkip("completions", f"scores differ by {best - worst:g} < min_score_margin {opts.min_score_margin:g}")
    chosen = reply_messages(chosen, f"completions[{b}].response", prompt)
    rejected = reply_messages(rejected, f"completions[{w}].response", prompt)
    return preference_record(row, prompt, chosen, rejected, opts)


def from_unpaired(row: dict, opts: Options) -> dict:
    """KTO-style `prompt`, `completion`, `label` (True: desirable), kept unpaired; an Alpaca prompt (`instruction`,
    `input`, `system`, `history`) in place of `prompt` is read as in preference rows."""
    check_no_row_reasoning(row)
    alpaca = "prompt" not in row and "instruction" in row  # a LLaMA-Factory Alpaca KTO entry (see `registry`)
    prompt = alpaca_prompt_messages(row) if alpaca else prompt_messages(row, "prompt")
    completion, thinking = reply_messages(row.get("completion"), "completion", prompt)
    return unpaired_record(row, prompt, completion, opts=opts, thinking=thinking)


FORMATS: dict[str, tuple[str, Callable[[dict, Options], dict]]] = {
    "messages": ("sft", from_messages),
    "sharegpt": ("sft", from_sharegpt),
    "alpaca": ("sft", from_alpaca),
    "erniekit_sft": ("sft", from_erniekit_sft),
    "erniekit_vl": ("sft", from_erniekit_vl),
    "vqa": ("sft", from_vqa),
    "prompt_completion": ("sft", from_prompt_completion),
    "preference": ("preference", from_preference),
    "erniekit_dpo": ("preference", from_erniekit_dpo),
    "rated": ("preference", from_rated),
    "sharegpt_preference": ("preference", from_sharegpt_preference),
    "pairwise_messages": ("preference", from_pairwise_messages),
    "unpaired": ("unpaired", from_unpaired),
    "kto_conversation": ("unpaired", from_kto_conversation),
    "rl": ("rl", from_rl),
    "gsm8k": ("rl", from_gsm8k),
    "math": ("rl", from_math),
}


@dataclass
class Converted:
    """One input row after conversion: a `record`, or an `error` (bad row) / `skip` (filtered) message."""

    where: str
    raw: dict | None
    record: dict | None = None
    error: str | None = None
    skip: str | None = None
    text: str | None = None
    note: str | None = None


def resolve_format(path: str, fmt: str, rows: list) -> str:
    """`fmt`, or the format most of the first parsed `rows` are in when `fmt` is `auto`."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UserError(f"{path}: unknown format '{fmt}'; expected one of: auto, {', '.join(FORMATS)}")
        return fmt
    if not rows:
        raise UserError(f"{path}: no rows (empty file); expected at least one row")
    first = next((r.row for r in rows if r.row is not None), None)
    if first is None:  # not one row parsed: the first one's own error says why (encoding, layout, ...)
        raise UserError(f"{rows[0].where}: {rows[0].error}")
    votes = Counter(detect(r.row) for r in rows if r.row is not None)
    votes.pop(None, None)
    if not votes:
        raise UserError(f"{path}: unknown format: cannot tell it from the keys ({', '.join(sorted(first))}); expected "
                        f"the keys of one of: {', '.join(FORMATS)} (see data_prep/README.md), or name it with "
                        "`format:`")
    return votes.most_common(1)[0][0]


def convert_rows(path: str, fmt: str, opts: Options, max_row_bytes: int, split: str = "train",
                 subset: str | None = None, remap=None) -> tuple[str, Iterator[Converted]]:
    """The resolved format of `path` and an iterator that converts each of its rows, never raising for a bad row.

    `remap` renames a raw row's keys first (a `dataset_info.json` entry's column and tag mapping)."""
    rows = read_rows(path, max_row_bytes, split, subset)
    if remap is not None:
        rows = (RawRow(r.where, remap(r.row) if r.row is not None else None, r.error, r.text) for r in rows)
    head = list(itertools.islice(rows, 100))
    fmt = resolve_format(path, fmt, head)
    convert = FORMATS[fmt][1]

    def generate():
        for raw in itertools.chain(head, rows):
            if raw.error:
                yield Converted(raw.where, None, error=raw.error, text=raw.text)
                continue
            try:
                record = convert(raw.row, opts)
            except RowSkip as exc:
                yield Converted(raw.where, raw.row, skip=str(exc))
                continue
            except RowError as exc:
                yield Converted(raw.where, raw.row, error=str(exc))
                continue
            note = (LITERAL_IMAGE_NOTE if has_literal_image_marker(record)
                    else UNOPENED_THINK_NOTE if has_unopened_think(raw.row) else None)
            yield Converted(raw.where, raw.row, record=record, note=note)

    return fmt, generate()

