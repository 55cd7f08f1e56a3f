"""SFT stage: TRL's SFTTrainer with a LoRA adapter, assistant-only loss, thinking and non-thinking rows in one run.

Launched by the pipeline, one process per stage:

    accelerate launch -m posttrain.stages.sft --config outputs/<run>/.sft.partial/resolved.yaml

Rows are conversational (`messages`), with an optional `thinking` column that becomes TRL's per-row
`chat_template_kwargs` (enable_thinking), or prompt/completion pairs. Pre-flight gates run on the trainer's own
tokenized data before the first step.
"""

import time

from .. import gates
from ..data import with_template_kwargs
from ..recipe import StageArguments
from . import common

SFT_COLUMNS = {"messages", "chat_template_kwargs", "tools", "images", "prompt", "completion", "text"}


def main(stage_args: StageArguments, training_args, model_args):
    """Train, save, verify and evaluate; returns the trainer (tests inspect its model)."""
    from trl import SFTTrainer

    started = time.time()
    common.set_threads()
    model, tokenizer, peft_config = common.load_policy(stage_args, training_args, model_args)
    dataset = common.keep_columns(with_template_kwargs(common.load_train_dataset(stage_args)), SFT_COLUMNS)
    if stage_args.preflight:
        gates.check_template_markers(tokenizer, training_args.assistant_only_loss)
        gates.check_conversations(dataset, stage_args.dataset_name)

    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    preflight = gates.check_collated_labels(trainer, tokenizer.eos_token_id) if stage_args.preflight else {}
    trainer.accelerator.print(f"[sft] pre-flight ok: {preflight}")
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    common.finish(trainer, "sft", stage_args, tokenizer, result, started, extra={"preflight": preflight})
    return trainer


def make_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    return TrlParser((StageArguments, SFTConfig, ModelConfig), prog="posttrain.stages.sft")


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
