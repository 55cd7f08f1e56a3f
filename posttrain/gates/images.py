"""Vision gates: one image per placeholder, image tokens `max_length` keeps whole (and replies it cuts), the processor
matching the model."""

import logging

from ..errors import UserError, row_name
from .lengths import reply_cut, warn_cut_replies

logger = logging.getLogger("posttrain")


def check_image_slots(dataset, name: str) -> None:
    """Every row has one image per image placeholder in its conversation; names the row.

    Rows whose messages are all plain strings have no placeholders: TRL puts their images at the start of the first
    user turn, so only those may have images and no placeholder."""
    columns = [c for c in ("messages", "prompt", "completion", "chosen", "rejected") if c in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(columns + ["images"]).to_list()):
        if isinstance(row["images"], str):  # its length would count characters as images
            raise UserError(f"pre-flight: {name} {row_name(index)}: \"images\" is one string ({row['images']!r}); "
                            f"expected a list of images, e.g. [{row['images']!r}]")
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
                            "expected {\"type\": \"image\"} parts (TRL's format). `posttrain data build_sft_set`, "
                            "`build_preference_set` and `build_prompt_set` turn the markers into parts")


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
