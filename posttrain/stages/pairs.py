"""The DPO stage's preference pairs: read, checked by the gates, text replies as messages, images decoded."""

from .. import gates
from ..data import data_folder, has_tool_turns, load_split, split_name
from ..errors import UserError, row_name
from ..models import vision


def load_pairs(stage_args, split: str, tokenizer, max_length: int | None, truncation_mode: str = "keep_start",
               allow_empty: bool = False, model=None):
    """The pairs of `split` and the indices of those `skip_bad_rows` skipped, checked as TRL will tokenize them
    (`max_length`, `truncation_mode`) and with the pre-flight gates `stage_args.preflight` turns on."""
    dataset = load_split(stage_args.dataset_name, split, stage_args.dataset_config, allow_empty=allow_empty)
    name = split_name(stage_args.dataset_name, split)
    skipped = []
    images = vision.has_images(dataset)
    gates.check_row_reasoning(dataset, name)
    if images and (tools := next((i for i, row in enumerate(dataset.select_columns(["chosen", "rejected"]))
                                  if has_tool_turns(row)), None)) is not None:
        # TRL tokenizes image pairs in its collator, past the masks of `trainers.dpo_trainer`: the results would count
        raise UserError(f"{name} {row_name(tools)}: a pair with images whose replies hold tool results; DPO scores "
                        "the tool results of image pairs as the model's own tokens, so it does not take them. Put "
                        "the tool exchange in the prompt, or train such pairs without images")
    if stage_args.preflight:
        gates.check_tools_column(dataset, name)  # before the checks below render the rows with their tools
        gates.check_turn_text(tokenizer, dataset, name, model)
        if not images:  # first: a template that drops the reasoning can make two replies look the same below
            gates.check_pair_reasoning(tokenizer, dataset, name)
        # Image prompts: text length says little about token length; the image-token gate checks truncation instead
        dataset, skipped = gates.check_preference_pairs(dataset, name, None if images else tokenizer, max_length,
                                                        allow_skip=stage_args.skip_bad_rows,
                                                        truncation_mode=truncation_mode)
    dataset = message_replies(dataset)
    return vision.decode_images(dataset, data_folder(stage_args.dataset_name), name), skipped  # (pairs, indices)


def message_replies(dataset):
    """Text replies to conversational prompts as assistant messages, as the gates and `data.preference_texts` read
    them: TRL takes a row in one format or the other, and stopped on a mixed one with a bare TypeError (it joins the
    prompt's list and the reply's text)."""
    first = dataset.select_columns(["prompt", "chosen"])[0] if len(dataset) else None  # its images not decoded
    if first is None or not isinstance(first["prompt"], list) or not isinstance(first["chosen"], str):
        return dataset
    return dataset.map(lambda row: {side: [{"role": "assistant", "content": row[side]}]
                                    for side in ("chosen", "rejected")})
