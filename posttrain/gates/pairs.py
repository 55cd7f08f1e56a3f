"""Preference-pair gates: a prompt that ends on the turn a reply answers, both replies present and different, also
once `max_length` cuts them; the rows left after skipping, for naming rows as the file does."""

from ..data import preference_texts, prompt_text
from ..errors import UserError, row_name
from ..models.vision import text_tokenizer
from .reasoning import non_thinking_reasoning, stripped_reply


def check_preference_pairs(dataset, name: str, tokenizer=None, max_length: int | None = None,
                           allow_skip: bool = False, truncation_mode: str = "keep_start"):
    """Bad pairs are an error naming the row, or a counted skip when allowed: an empty side, chosen == rejected (tool
    calls included), or a prompt so long that truncation to `max_length` would leave no reply token to learn from
    (`keep_start` truncation, TRL's default; `keep_end` keeps the reply, and cuts replies that differ only in their
    start to the same tokens). Returns the kept pairs and the indices of the skipped ones."""
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
        chosen, rejected = stripped_reply(row["chosen"]), stripped_reply(row["rejected"])
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
        elif tokenizer is not None and max_length and truncation_mode == "keep_end" and \
                _same_at_the_end(tokenizer, row, max_length):
            # `keep_end` cuts the start of each prompt + reply: replies that differ only in their first words
            reason = (f"chosen and rejected are the same in the last {max_length} tokens max_length={max_length} "
                      "keeps (truncation_mode: keep_end); raise max_length")
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


def _same_at_the_end(tokenizer, row: dict, max_length: int) -> bool:
    """Whether a pair's prompt + chosen and prompt + rejected, tokenized whole as TRL tokenizes them (a text prompt
    with the tokenizer's special tokens), agree in their last `max_length` tokens."""
    eos = text_tokenizer(tokenizer).eos_token
    prompt, chosen, rejected = preference_texts(tokenizer, row, eos)
    ids = [tokenizer(prompt + reply, add_special_tokens=isinstance(row["prompt"], str))["input_ids"][-max_length:]
           for reply in (chosen, rejected)]
    return ids[0] == ids[1]


def _same_once_cut(tokenizer, row: dict, budget: int) -> bool:
    """Whether a pair's replies, as TRL tokenizes them (`data.preference_texts`), agree in their first `budget`
    tokens."""
    eos = text_tokenizer(tokenizer).eos_token
    _, chosen, rejected = preference_texts(tokenizer, row, eos)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:budget] for text in (chosen, rejected)]
    return ids[0] == ids[1]
