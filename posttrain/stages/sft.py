"""SFT stage: TRL's SFTTrainer with a LoRA adapter, assistant-only loss, thinking and non-thinking rows in one run.

Launched by the pipeline, one process per stage:

    accelerate launch -m posttrain.stages.sft --config outputs/<run>/.sft.partial/resolved.yaml

Rows are conversational (`messages`), with an optional `thinking` column that becomes TRL's per-row
`chat_template_kwargs` (enable_thinking), or prompt/completion pairs. Pre-flight gates run on the trainer's own
tokenized data before the first step.

With an `images` column and a vision-language model (its processor as the tokenizer), TRL's vision collator renders
and processes each batch on the fly; rows become prompt/completion (`posttrain.models.vision`) so each keeps its thinking
mode, and the loss is on the reply (ERNIE-4.5-VL's expert routing is laid over it too: `posttrain.moe_routing`).
Extra gates: images per placeholder, image tokens not cut by `max_length`, processor and model belonging together.
"""

import dataclasses
import logging
import time

from .. import gates
from ..configs import StageArguments
from ..data import data_folder, split_name, with_template_kwargs
from ..errors import UserError
from ..models import vision
from . import common, training

logger = logging.getLogger("posttrain")
SFT_COLUMNS = {"messages", "chat_template_kwargs", "tools", "images", "prompt", "completion", "text"}


def main(stage_args: StageArguments, training_args, model_args):
    """Train, save, verify and evaluate; returns the trainer (tests inspect its model)."""
    from trl import SFTTrainer

    started = time.time()
    common.set_threads()
    model, tokenizer, peft_config = common.load_policy(stage_args, training_args, model_args)
    dataset = common.load_train_dataset(stage_args)
    images = vision.has_images(dataset)
    gates.check_sft_columns(dataset, stage_args.dataset_name, training_args.dataset_text_field,
                            training_args.assistant_only_loss and not images)
    gates.check_row_reasoning(dataset, stage_args.dataset_name)
    dataset = common.keep_columns(with_template_kwargs(dataset), SFT_COLUMNS | {training_args.dataset_text_field})
    text_checks = {}
    if stage_args.preflight:
        gates.check_conversations(dataset, stage_args.dataset_name)  # first: the checks below render the rows
        gates.check_tools_column(dataset, stage_args.dataset_name)
        gates.check_template_renders(tokenizer, dataset, stage_args.dataset_name)
        gates.check_thinking_modes(tokenizer, dataset, stage_args.dataset_name)
        gates.check_non_thinking_replies(dataset, stage_args.dataset_name)
        gates.check_turn_text(tokenizer, dataset, stage_args.dataset_name, model)
        if not images:  # image rows train on the reply without the template's markers (see vision_rows)
            gates.check_template_markers(tokenizer, training_args.assistant_only_loss)
            text_checks = gates.check_tool_calls(tokenizer, dataset, stage_args.dataset_name)
            gates.check_reasoning(tokenizer, dataset, stage_args.dataset_name)
        text_checks.update(gates.check_prompt_boundary(tokenizer, dataset, stage_args.dataset_name))
    if images:
        dataset = vision_rows(dataset, training_args, stage_args)

    problem = common.padding_free_problem(model, images) if training_args.padding_free else None
    problem = problem or neftune_problem(training_args)
    flatten = flatten_requested(training_args, problem)
    heldout = heldout_rows(stage_args, training_args, images, tokenizer, model)
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=dataset, eval_dataset=heldout, processing_class=tokenizer,
        peft_config=peft_config
    )
    training.guard_checkpoints(trainer)
    end_of_turn = None
    if stage_args.preflight:
        end_of_turn = gates.end_of_turn_ids(vision.text_tokenizer(tokenizer), getattr(trainer, "chat_template", None))
    # image gates first: cut image tokens would also show up below as rows with nothing to train
    preflight = common.prepare_trainer(trainer, model, stage_args, model_args, images, end_of_turn=end_of_turn)
    preflight.update(report_dropped_rows(trainer, len(dataset), training_args, stage_args.dataset_name))
    if heldout is not None:
        preflight.update(report_dropped_heldout(trainer, len(heldout), training_args,
                                                split_name(stage_args.dataset_name, stage_args.dataset_test_split)))
    if stage_args.preflight:
        preflight.update(gates.check_collated_labels(trainer, end_of_turn))
        preflight.update(report_cut_replies(trainer, training_args, end_of_turn, stage_args.dataset_name))
        preflight.update(text_checks)
    if flatten:  # after the gates, which check the labels row by row
        flatten_batches(trainer)
    if trainer.padding_free:
        preflight["attention"] = common.attend_by_row(trainer.model, model_args)
    trainer.accelerator.print(f"[sft] pre-flight ok: {preflight}")
    result = training.train(trainer, training_args, stage_args)
    common.finish(trainer, "sft", stage_args, tokenizer, result, started, extra={"preflight": preflight})
    return trainer


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
    if rows and dropped == rows:
        raise UserError(f"pre-flight: {name}: none of its {rows} rows has a reply token left within max_length="
                        f"{training_args.max_length}, so there is nothing to train on; raise max_length (or shorten "
                        "their prompts)")
    if dropped:
        logger.warning("pre-flight: %s: %d of %d rows have no reply token left within max_length=%s, so they train "
                       "nothing; raise max_length (or shorten their prompts) to train on them", name, dropped, rows,
                       training_args.max_length)
    return {"rows_dropped": dropped}


def report_dropped_heldout(trainer, rows: int, training_args, name: str) -> dict:
    """The held-out rows TRL leaves out as it leaves out training ones (`report_dropped_rows`): its eval_loss is over
    the rest, and with none left it logs none at all, without a word. Packed, TRL keeps them (they add nothing)."""
    if training_args.packing if training_args.eval_packing is None else training_args.eval_packing:
        return {}
    dropped = rows - len(trainer.eval_dataset)
    if rows and dropped == rows:
        raise UserError(f"pre-flight: {name}: none of its {rows} rows has a reply token left within max_length="
                        f"{training_args.max_length}, so TRL would log no eval_loss; raise max_length (or shorten "
                        "their prompts)")
    if dropped:
        logger.warning("pre-flight: %s: %d of %d held-out rows have no reply token left within max_length=%s, so "
                       "eval_loss leaves them out; raise max_length (or shorten their prompts) to measure them", name,
                       dropped, rows, training_args.max_length)
    return {"heldout_rows_dropped": dropped}


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


def heldout_rows(stage_args, training_args, images: bool, tokenizer, model=None):
    """`common.load_test_split` for TRL's eval loss, prepared as the training rows are; None without it."""
    dataset = common.load_test_split(stage_args, training_args)
    if dataset is None:
        return None
    name = split_name(stage_args.dataset_name, stage_args.dataset_test_split)
    # as the training rows: a row in no SFT format, or a malformed conversation, stopped TRL's tokenization with a
    # bare error (a KeyError, a Jinja error, "the chat template doesn't generate assistant masks"); such text skews
    # the eval loss
    gates.check_sft_columns(dataset, name, training_args.dataset_text_field)
    if stage_args.preflight:
        gates.check_conversations(dataset, name)
        gates.check_turn_text(tokenizer, dataset, name, model)
    dataset = common.keep_columns(with_template_kwargs(dataset), SFT_COLUMNS | {training_args.dataset_text_field})
    return vision_rows(dataset, training_args, stage_args, name) if images else dataset


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


def vision_rows(dataset, training_args, stage_args, name: str | None = None):
    """Image rows for TRL's vision collator: decoded images, prompt/completion rows that keep their thinking mode.
    `name` (default `dataset_name`) names the set in errors, e.g. with its split."""
    if "messages" in dataset.column_names and training_args.assistant_only_loss:
        training_args.assistant_only_loss = False  # completion-only loss on the reply instead (see models/vision.py)
    training_args.remove_unused_columns = False  # keep `chat_template_kwargs`: the collator renders each row with it
    images = vision.decode_images(dataset, data_folder(stage_args.dataset_name), name or stage_args.dataset_name)
    return vision.sft_rows_to_prompt_completion(images)


def make_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    return TrlParser((StageArguments, SFTConfig, ModelConfig), prog="posttrain.stages.sft")


if __name__ == "__main__":
    common.entry("sft", main, make_parser)
