"""Replies `max_length` cuts before their end-of-turn token: the test on a row's labels, the warning, DPO's count per
side."""

import logging

logger = logging.getLogger("posttrain")


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
    text rows as TRL tokenized them (`sft_batches.report_cut_replies`, `count_cut_pairs`), image rows as its collator
    cuts them (`check_image_tokens`). `side`: DPO's "chosen" or "rejected" reply of `rows` pairs; `heldout`: pairs
    that are scored, not trained."""
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
