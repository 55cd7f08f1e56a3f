"""What TRL's SFTTrainer makes of the rows: the rows it drops or cuts once tokenized to `max_length` (counted and
warned, an error when none is left), and padding-free batches where TRL would refuse them (`max_length` without
packing) or they would change the loss (NEFTune)."""

import dataclasses
import logging

from .. import gates
from ..errors import UserError

logger = logging.getLogger("posttrain")


def neftune_problem(training_args) -> str | None:
    """NEFTune scales its noise by 1 / sqrt(sequence length x width) (transformers' `neftune_post_forward_hook`): on a
    padding-free batch, one sequence of all its rows, that length is the batch's, so 8 rows got 2.4x less noise than
    TRL's padded batches. `padding_free` is a speed default, so such batches stay padded (packing is TRL's layout:
    left as TRL has it). Returns the reason, logged, or None."""
    if not training_args.padding_free or training_args.packing or not training_args.neftune_noise_alpha:
        return None
    logger.warning("padding_free is off: NEFTune's noise would be scaled by the whole batch's length")
    return "NEFTune's noise is scaled by the sequence length"


def report_dropped_rows(trainer, rows: int, training_args, name: str) -> dict:
    """TRL leaves out, without a word, the rows with no trained token left once cut to `max_length` (a reply behind a
    long prompt; packed, it keeps them, each taking its place in a sequence and training nothing): say how many, so a
    recipe does not train on part of its data unawares. None left is an error: the Trainer stopped on its empty sampler
    with a bare ValueError (packed, it trained on nothing)."""
    if training_args.packing:
        dropped = sum(all(label == -100 for label in labels) for labels in row_labels(trainer, training_args))
    else:
        dropped = rows - len(trainer.train_dataset)
    _say_dropped(name, dropped, rows, training_args.max_length, "rows", "there is nothing to train on",
                 "they train nothing", "to train on them")
    return {"rows_dropped": dropped}


def report_dropped_heldout(trainer, rows: int, training_args, name: str) -> dict:
    """The held-out rows TRL leaves out as it leaves out training ones (`report_dropped_rows`): its eval_loss is over
    the rest, and with none left it logs none at all, without a word. Packed, TRL keeps them (they add nothing)."""
    if training_args.packing if training_args.eval_packing is None else training_args.eval_packing:
        return {}
    dropped = rows - len(trainer.eval_dataset)
    _say_dropped(name, dropped, rows, training_args.max_length, "held-out rows", "TRL would log no eval_loss",
                 "eval_loss leaves them out", "to measure them")
    return {"heldout_rows_dropped": dropped}


def _say_dropped(name: str, dropped: int, rows: int, max_length, what: str, if_none: str, if_some: str,
                 to: str) -> None:
    """An error when none of the `rows` is left, a warning when some are not."""
    if rows and dropped == rows:
        raise UserError(f"pre-flight: {name}: none of its {rows} rows has a reply token left within max_length="
                        f"{max_length}, so {if_none}; raise max_length (or shorten their prompts)")
    if dropped:
        logger.warning("pre-flight: %s: %d of %d %s have no reply token left within max_length=%s, so %s; raise "
                       "max_length (or shorten their prompts) %s", name, dropped, rows, what, max_length, if_some, to)


def report_cut_replies(trainer, training_args, end_of_turn: set[int], name: str) -> dict:
    """`check_collated_labels` refuses a reply that `max_length` cuts before its end-of-turn token, but it collates the
    first rows only: the same rows further on trained without a word, on replies that never stop. Count them all
    (a warning, and `rows_cut` in the pre-flight record)."""
    columns = trainer.train_dataset.column_names or []
    if training_args.max_length is None or not {"input_ids", "labels"} <= set(columns):
        return {}  # without max_length nothing is cut; image rows are counted as collated (check_image_tokens)
    rows = cut = 0
    for labels in row_labels(trainer, training_args):
        rows += 1
        cut += len(labels) >= training_args.max_length and gates.reply_cut(labels, end_of_turn)
    gates.warn_cut_replies(name, cut, rows, training_args.max_length, training_args.packing)
    return {"rows_cut": cut}


def row_labels(trainer, training_args):
    """Each training row's labels, one row at a time. Packed, the rows of TRL's sequences as `bfd` packing (TRL's
    default) cut them to `max_length` (`truncation_mode` does not apply there); the other strategies split a long row
    into pieces trained in other sequences, cutting no reply short: no rows to count."""
    if not training_args.packing:
        yield from trainer.train_dataset.select_columns(["labels"])["labels"]
        return
    if training_args.packing_strategy != "bfd" or not {"labels", "seq_lengths"} <= set(
            trainer.train_dataset.column_names or []):
        return
    for packed in trainer.train_dataset.select_columns(["labels", "seq_lengths"]):
        start = 0
        for length in packed["seq_lengths"]:
            yield packed["labels"][start:start + length]
            start += length


def flatten_requested(training_args, problem: str | None) -> bool:
    """`padding_free` with `max_length` and no packing: TRL refuses it (it would not truncate), so the stage lets TRL
    tokenize and truncate with padded batches, then flattens them (`flatten_batches`). Returns whether to. With a
    `problem` (`common.padding_free_problem`: image rows, multimodal positions) the batches stay padded."""
    if not training_args.padding_free or training_args.packing:
        return False
    if problem:  # logged by padding_free_problem
        training_args.padding_free = False
        return False
    if training_args.max_length is None:
        return False  # TRL's own padding-free path
    training_args.padding_free = False
    return True


def flatten_batches(trainer) -> None:
    """Padding-free batches: the rows of a batch concatenated into one sequence with position ids restarting at each
    row (TRL's own collator with `padding_free=True`), so no compute is spent on padding; attention stays within each
    row (transformers builds a block-diagonal mask from the position ids; flash-attention kernels take the row
    boundaries). Same loss as padded batches (tested)."""
    trainer.data_collator = dataclasses.replace(trainer.data_collator, padding_free=True)
    trainer.padding_free = trainer.args.padding_free = True


def loss_over_the_steps_tokens(trainer) -> None:
    """TRL's SFT loss is the sum of the step's token losses over `num_items_in_batch`, the trained tokens of the whole
    optimizer step (every accumulated micro-batch, and every process with `average_tokens_across_devices`), which the
    Trainer (transformers 5.23) counts and passes only when `model_accepts_loss_kwargs`. It reads that from the
    model's `accepts_loss_kwargs`, which many VLMs set to False for their own loss (ERNIE-4.5-VL, Qwen2.5-VL, Qwen3-VL,
    Gemma 4); TRL (1.16) computes the loss itself and does not reset it, so on those models each micro-batch's loss was
    its own tokens' mean, averaged over the accumulation steps and processes: 2 x 2 accumulated rows trained other
    weights than 4 rows, and two processes other weights than one. Left alone under Ulysses sequence parallelism,
    where TRL takes the model's own loss."""
    config = getattr(trainer.accelerator, "parallelism_config", None)
    if config is not None and config.sp_backend == "deepspeed" and config.sp_enabled:
        return
    trainer.model_accepts_loss_kwargs = True
