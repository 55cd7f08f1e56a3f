"""DPO stage: TRL's DPOTrainer continuing the previous stage's LoRA adapter, the frozen copy of it as reference.

    accelerate launch -m posttrain.stages.dpo --config outputs/<run>/.dpo.partial/resolved.yaml

Given a PeftModel that already holds a trained adapter (and no peft_config), DPOTrainer copies that adapter into a
frozen "ref" adapter and trains the original: the previous stage is the reference model and the base weights are in
memory once. Directly on a base model (no previous stage), a fresh LoRA adapter is trained and the reference is the
model with the adapter disabled.

Rows: `prompt`/`chosen`/`rejected`, conversational or plain text, optionally `thinking` (per-row template switch)
and `images` (with a vision-language model: TRL's vision preference collator, with ERNIE-4.5-VL's expert routing
laid over the replies by `posttrain.moe_routing`; extra gates as in SFT).
`dataset_test_split` names held-out pairs: TRL logs reward accuracy/margin on them at each eval step (with an
`eval_strategy`), and this stage measures the policy's own preference accuracy on them before and after training
(`preference.before` / `preference.after` in metrics.json).
"""

import time

from .. import gates
from ..configs import StageArguments
from ..data import is_data_file, split_name, with_template_kwargs
from ..errors import UserError
from ..models import vision
from . import adapter_checks, common, training
from .pairs import load_pairs

DPO_COLUMNS = {"prompt", "chosen", "rejected", "chat_template_kwargs", "images", "tools"}


def main(stage_args: StageArguments, training_args, model_args):
    """Train, save, verify and evaluate; returns the trainer."""
    from ..scoring import preference_eval
    from ..trainers.dpo_trainer import DPOTrainer

    started = time.time()
    common.set_threads()
    model, tokenizer, peft_config = common.load_policy(stage_args, training_args, model_args)
    truncation = getattr(training_args, "truncation_mode", "keep_start")
    check_test_split(stage_args)  # first: it needs no pair read
    train, skipped = load_pairs(stage_args, stage_args.dataset_train_split, tokenizer, training_args.max_length,
                                truncation, model=model)
    source_rows = gates.kept_rows(len(train) + len(skipped), skipped) if skipped else None  # image gate's row names
    if stage_args.max_train_samples:
        train = train.select(range(min(stage_args.max_train_samples, len(train))))
    train = with_template_kwargs(train)  # once: the trainer and the prompt-boundary gate read the same rows
    heldout, no_heldout = heldout_pairs(stage_args, training_args, tokenizer, truncation, model)
    images = vision.has_images(train)
    # TRL (1.16) turns its own padding-free DPO off; the stage packs the padded batches itself
    problem = common.padding_free_problem(model, images) if training_args.padding_free else None
    packed, training_args.padding_free = training_args.padding_free and not problem, False

    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=common.keep_columns(train, DPO_COLUMNS),
        eval_dataset=common.keep_columns(with_template_kwargs(heldout), DPO_COLUMNS) if heldout else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    training.guard_checkpoints(trainer)
    end_of_turn = gates.end_of_turn_ids(vision.text_tokenizer(tokenizer)) if stage_args.preflight else None
    preflight = common.prepare_trainer(trainer, model, stage_args, model_args, images, source_rows, end_of_turn)
    if packed:
        preflight.update(padding_free=True, attention=common.pack_scoring(trainer, model_args))
    if stage_args.preflight and not images:
        preflight.update(text_pair_checks(trainer, tokenizer, train, stage_args, truncation, end_of_turn))
    before, heldout_rows, sharded = None, None, adapter_checks.sharded_weights(trainer)

    def score_heldout() -> dict:  # before and after training, on the same rows
        # as many replies a forward as TRL's own evaluation of these pairs scores (its fused head keeps no logits)
        return preference_eval(trainer.model, tokenizer, heldout_rows, stage_args.eval_dtype,
                               training_args.per_device_eval_batch_size, training_args.max_length, truncation)

    if no_heldout:
        trainer.accelerator.print(f"[dpo] held-out preference accuracy before/after not measured: {no_heldout}")
    elif heldout is not None and sharded:
        trainer.accelerator.print(f"[dpo] held-out preference accuracy not measured: {sharded}")
    elif heldout is not None and trainer.accelerator.is_main_process:
        heldout_rows = vision.as_rows(heldout)  # read once, scored before and after training
        before = score_heldout()
        trainer.accelerator.print(f"[dpo] held-out preference accuracy before: {before['accuracy']:.1%}")
    result = training.train(trainer, training_args, stage_args)
    after = score_heldout() if before is not None else None
    if after:
        trainer.accelerator.print(f"[dpo] held-out preference accuracy after: {after['accuracy']:.1%}")
    extra = {"preference": {"before": before, "after": after}, "preflight": {"pairs_skipped": len(skipped), **preflight}}
    common.finish(trainer, "dpo", stage_args, tokenizer, result, started, extra=extra)
    return trainer


def text_pair_checks(trainer, tokenizer, train, stage_args, truncation: str, end_of_turn: set[int]) -> dict:
    """The prompt-boundary gate, and the text pairs `max_length` cuts before a reply's end-of-turn token: trained
    (`pairs_cut`) and held out (`heldout_pairs_cut`, which the preference accuracy before/after scores cut)."""
    name, max_length = stage_args.dataset_name, trainer.args.max_length
    found = {**gates.check_prompt_boundary(tokenizer, train, name),
             **gates.count_cut_pairs(trainer.train_dataset, max_length, truncation, end_of_turn, name)}
    heldout_name = split_name(stage_args.dataset_name, stage_args.dataset_test_split)
    if trainer.eval_dataset is not None and (heldout := gates.count_cut_pairs(
            trainer.eval_dataset, max_length, truncation, end_of_turn, heldout_name, heldout=True)):
        found["heldout_pairs_cut"] = heldout["pairs_cut"]
    return found


def check_test_split(stage_args) -> None:
    """A `dataset_test_split` names other pairs than the training ones: not a split of one data file."""
    if stage_args.dataset_test_split and is_data_file(stage_args.dataset_name):
        raise UserError(f"dataset_test_split: '{stage_args.dataset_test_split}', but dataset_name "
                        f"{stage_args.dataset_name} is one data file, whose every split is the whole file: the "
                        "held-out pairs would be the training pairs. Give a folder with train and test splits "
                        "(build_preference_set writes one), or drop dataset_test_split")


def heldout_pairs(stage_args, training_args, tokenizer, truncation: str, model) -> tuple:
    """The `dataset_test_split` pairs, checked as the training pairs are (None without one), and why nothing is
    measured on them where the split holds no pairs (else None)."""
    if not stage_args.dataset_test_split:
        return None, None
    heldout, _ = load_pairs(stage_args, stage_args.dataset_test_split, tokenizer, training_args.max_length,
                            truncation, allow_empty=True, model=model)
    if not len(heldout):  # build_onpolicy_pairs' test split when no test prompt gave a pair: nothing to measure
        return None, empty_heldout(stage_args, training_args)
    return heldout, None


def empty_heldout(stage_args, training_args) -> str:
    """Why nothing is measured on an empty `dataset_test_split`; an `eval_strategy` is turned off, as the Trainer
    refuses one without an eval dataset and TRL's evaluation of no pairs would have nothing to report."""
    reason = f"{split_name(stage_args.dataset_name, stage_args.dataset_test_split)} holds no pairs"
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no":
        reason += f"; TRL's evaluation (eval_strategy: {strategy}) is off for the same reason"
        training_args.eval_strategy = "no"
    return reason


def make_parser():
    from trl import DPOConfig, ModelConfig, TrlParser

    return TrlParser((StageArguments, DPOConfig, ModelConfig), prog="posttrain.stages.dpo")


if __name__ == "__main__":
    common.entry("dpo", main, make_parser)
