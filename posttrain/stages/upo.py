"""UPO stage: GRPO-style RL with verifier rewards plus a DPO loss on preference pairs (`posttrain.trainers`).

    accelerate launch -m posttrain.stages.upo --config outputs/<run>/.upo.partial/resolved.yaml

Rows: `prompt` (conversational), `answer`, `domain`, `thinking`, optionally `images` (with a vision-language
model). The policy continues the previous stage's adapter, whose frozen copy is the reference of the DPO term; rewards
come by name from `posttrain.rewards.REWARDS`. Image prompts are rendered by GRPO in one thinking mode: with
`chat_template_kwargs: {enable_thinking: false}` (or true) the stage keeps the prompts of that mode.

Curriculum (ERNIE 4.5's progressive RL: logic first, then math and code, then general): `phases` lists ordered
slices of the prompts, e.g. `[{domains: [comparison, counting], num_prompts: 64}, {domains: [arithmetic], ...}]`.
The stage concatenates them in order and turns off GRPO's dataset shuffling, so training walks through the phases
in sequence within one run (one optimizer, one schedule, one reference).
"""

import time

from .. import gates
from ..configs import CurriculumArguments, StageArguments
from ..data import split_name
from ..models import vision
from ..trainers.upo_pairs import render_prompts
from . import common, training
from .upo_prompts import check_rollout_context, curriculum, gated_prompts, image_prompts, preflight_data, upo_columns


def main(stage_args: StageArguments, training_args, model_args, curriculum_args: CurriculumArguments):
    """Train, save (the trained adapter only), verify and evaluate; returns the trainer."""
    from ..trainers import UPOTrainer

    started = time.time()
    common.set_threads()
    model, tokenizer, peft_config = common.load_policy(stage_args, training_args, model_args)
    dataset = common.load_train_dataset(stage_args)
    gates.check_prompt_rows(dataset, stage_args.dataset_name)
    if stage_args.preflight:
        gates.check_turn_text(tokenizer, dataset, stage_args.dataset_name, model)
    dataset = common.keep_columns(dataset, upo_columns(training_args))
    dataset, offline, preflight = preflight_data(dataset, stage_args, training_args, tokenizer, model)
    if offline is not None and not vision.has_images(offline):  # cut to max_completion_length, as rollouts are
        check_rollout_context(model, tokenizer, offline, training_args, f"{training_args.upo_offline_dataset} (train)")
    images = vision.has_images(dataset)
    if images:  # before the phases join: each file's relative image paths are read against its own folder
        dataset = image_prompts(dataset, training_args, stage_args.dataset_name)
    if curriculum_args.phases:
        dataset = curriculum(dataset, stage_args, curriculum_args.phases, training_args, tokenizer, model, images,
                             preflight)
        training_args.shuffle_dataset = False  # the phase order is the point
    if not images and stage_args.preflight:
        # rendered here once (the trainer keeps text prompts as they are), then measured as GRPO will tokenize them
        dataset = render_prompts(dataset, tokenizer, training_args.chat_template_kwargs)
        check_rollout_context(model, tokenizer, dataset, training_args, stage_args.dataset_name)
    trainer = UPOTrainer(model, args=training_args, train_dataset=dataset,
                         eval_dataset=heldout_prompts(stage_args, training_args, images, tokenizer, model, preflight),
                         processing_class=tokenizer,
                         peft_config=peft_config, offline_dataset=offline)
    training.guard_checkpoints(trainer)
    problem = common.padding_free_problem(model, images) if training_args.padding_free else None
    if training_args.padding_free and not problem:
        preflight.update(padding_free=True, attention=common.pack_scoring(trainer, model_args))
    frozen = common.freeze_vision(trainer, stage_args, model_args)
    result = training.train(trainer, training_args, stage_args)
    extra = {"upo": {"lambda": training_args.upo_lambda, "mode": training_args.upo_mode,
                     "rewards": training_args.rewards, "phases": curriculum_args.phases},
             "preflight": {**preflight, **frozen}}
    common.finish(trainer, "upo", stage_args, tokenizer, result, started, extra=extra)
    return trainer


def heldout_prompts(stage_args, training_args, images: bool, tokenizer, model=None, record: dict | None = None):
    """`common.load_test_split` for GRPO's evaluation (rewards, and the DPO term of online pairs), through the
    prompt gates the training prompts pass, the prompts skipped counted in `record` as `heldout_prompts_skipped`;
    None without it."""
    dataset = common.load_test_split(stage_args, training_args)
    if dataset is None:
        return None
    name = split_name(stage_args.dataset_name, stage_args.dataset_test_split)
    return gated_prompts(dataset, stage_args, training_args, name, stage_args.dataset_name, images, tokenizer, model,
                         record, "heldout_prompts_skipped")


def make_parser():
    from trl import ModelConfig, TrlParser

    from ..trainers import UPOConfig

    return TrlParser((StageArguments, UPOConfig, ModelConfig, CurriculumArguments), prog="posttrain.stages.upo")


if __name__ == "__main__":
    common.entry("upo", main, make_parser)
