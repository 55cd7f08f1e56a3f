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

import logging
import time

from .. import gates
from ..configs import StageArguments
from ..data import data_folder, split_name, with_template_kwargs
from ..models import vision
from . import common, training
from .sft_batches import (
    flatten_batches,
    flatten_requested,
    loss_over_the_steps_tokens,
    neftune_problem,
    report_cut_replies,
    report_dropped_heldout,
    report_dropped_rows,
)

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
    loss_over_the_steps_tokens(trainer)
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
