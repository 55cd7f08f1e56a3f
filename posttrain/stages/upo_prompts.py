"""The UPO stage's prompts before the trainer sees them: the gates every prompt file passes (references for the
rewards, special-token text, the context a rollout needs), the offline pairs' gates, image prompts of the thinking mode
GRPO renders, and the curriculum's phases joined in order."""

from .. import gates
from ..data import data_folder
from ..errors import UserError
from ..generation import check_context
from ..models import vision
from ..reward_inputs import reward_columns
from ..rewards import REWARD_COLUMNS
from ..trainers.upo_pairs import render_prompt_text
from . import common

UPO_COLUMNS = {"prompt", *REWARD_COLUMNS}  # what GRPO and the rewards read


def curriculum(dataset, stage_args, phases: list[dict], training_args, tokenizer=None, model=None, images=False,
               record: dict | None = None):
    """Concatenate the phases' prompts in order; each phase shuffled within itself. A phase's own file passes the
    gates the main prompts pass (`gated_prompts`), named by the phase, its images read against its own folder; the
    prompts it skips are counted in `record` (the pre-flight record) as the main file's are."""
    from datasets import Features, concatenate_datasets

    from ..data import load_split

    parts = []
    for index, phase in enumerate(phases):
        unknown = set(phase) - {"domains", "num_prompts", "dataset_name", "split"}
        if unknown:
            raise UserError(f"upo phases[{index}]: unknown key(s) {sorted(unknown)}; expected domains, num_prompts, "
                            "dataset_name, split")
        _check_phase_values(phase, index)
        source = dataset
        if "dataset_name" in phase:
            split = phase.get("split", stage_args.dataset_train_split)
            source = gated_prompts(load_split(phase["dataset_name"], split), stage_args, training_args,
                                   f"upo phases[{index}]: {phase['dataset_name']} ({split})", phase["dataset_name"],
                                   images, tokenizer, model, record)
        if phase.get("domains"):
            if "domain" not in source.column_names:
                raise UserError(f"upo phases[{index}]: `domains` needs a `domain` column in the prompts; they have: "
                                f"{', '.join(source.column_names)}")
            wanted = set(phase["domains"])
            source = source.filter(lambda row, wanted=wanted: row["domain"] in wanted)
        if len(source) == 0:
            raise UserError(f"upo phases[{index}]: no prompts match {phase}")
        source = source.shuffle(seed=training_args.seed + index)
        if phase.get("num_prompts"):
            source = source.select(range(min(phase["num_prompts"], len(source))))
        parts.append(common.keep_columns(source, upo_columns(training_args)))
    try:
        return concatenate_datasets(parts)
    except ValueError as error:  # a column stored as JSON values in one file (data_prep's image sets), as structs in another
        as_json = {name: feature for part in parts for name, feature in part.features.items() if _holds_json(feature)}
        try:
            return concatenate_datasets([part.cast(Features({name: as_json.get(name, feature)
                                                             for name, feature in part.features.items()}))
                                         for part in parts])
        except (ValueError, TypeError):
            raise UserError(f"upo phases: the phases' prompts cannot be joined ({error}); store each phase's columns "
                            "as the training prompts store them (e.g. build them with the same data_prep job)") from error


def _check_phase_values(phase: dict, index: int) -> None:
    """`domains` is a list of domain names and `num_prompts` a positive count: `domains: logic` matched each letter,
    `num_prompts: -1` left the phase out and `0` kept all its prompts, without a word."""
    domains, count = phase.get("domains"), phase.get("num_prompts")
    if domains is not None and not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
        raise UserError(f"upo phases[{index}]: domains is {domains!r}; expected a list of domain names, e.g. [logic]")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise UserError(f"upo phases[{index}]: num_prompts is {count!r}; expected a positive whole number (leave it "
                        "out to keep all the phase's prompts)")


def _holds_json(feature) -> bool:
    """Whether a `datasets` feature is, or holds, `Json` (values of any shape, e.g. a message's content parts)."""
    from datasets import Json

    if isinstance(feature, dict):
        return any(map(_holds_json, feature.values()))
    return isinstance(feature, Json) or _holds_json(getattr(feature, "feature", None) or {})


def upo_columns(training_args) -> set[str]:
    """`UPO_COLUMNS`, the columns rewards of your own name as parameters (`reward_inputs.reward_columns`) and the column
    `normalize_rewards_by` names (e.g. `source`): dropped with the others, the trainer said the prompts had no such
    column, and a reward never saw its own. (Tests pass a namespace without the fields.)"""
    column = getattr(training_args, "normalize_rewards_by", None)
    return UPO_COLUMNS | reward_columns(getattr(training_args, "rewards", None)) | ({column} if column else set())


def check_rollout_context(model, tokenizer, dataset, training_args, name: str) -> None:
    """Each prompt, as GRPO tokenizes it, and `max_completion_length` rollout tokens after it fit the model's
    positions (`generation.check_context`): past them rollouts are noise that the rewards score and the policy learns."""
    thinking = dataset["thinking"] if "thinking" in dataset.column_names else [None] * len(dataset)
    prompts = [render_prompt_text(tokenizer, prompt, mode, training_args.chat_template_kwargs)
               for prompt, mode in zip(dataset["prompt"], thinking)]
    try:
        check_context(model, tokenizer, prompts, training_args.max_completion_length,
                      "stages.upo.max_completion_length")
    except UserError as error:  # which prompts: the training or the held-out ones
        raise UserError(f"{name}: {error}") from None


def gated_prompts(dataset, stage_args, training_args, name: str, dataset_name: str, images: bool, tokenizer,
                  model=None, record: dict | None = None, key: str = "prompts_skipped"):
    """Prompts other than the training file (held-out ones, a curriculum phase's own file) through the gates the
    training prompts pass, named `name`; image paths are read against `dataset_name`'s folder. The prompts skipped
    (`skip_bad_rows`) are added to `record[key]`: they were left out without a word or a count."""
    gates.check_prompt_rows(dataset, name)
    if stage_args.preflight:  # as the training prompts: images per placeholder, then special-token text
        gates.check_turn_text(tokenizer, dataset, name, model)
    dataset = common.keep_columns(dataset, upo_columns(training_args))
    if stage_args.preflight:
        dataset, skipped = gates.check_reward_references(dataset, training_args.rewards, name,
                                                         allow_skip=stage_args.skip_bad_rows)
        if record is not None:
            record[key] = record.get(key, 0) + skipped
    if images:
        return image_prompts(dataset, training_args, dataset_name, name)
    if stage_args.preflight and model is not None:  # GRPO samples rollouts from these prompts too
        check_rollout_context(model, tokenizer, dataset, training_args, name)
    return dataset


def preflight_data(dataset, stage_args, training_args, tokenizer=None, model=None):
    """The gates before the first step: every prompt has the reference its rewards read, and the offline pairs (for
    `upo_mode` offline or both) are real pairs (a chosen == rejected pair leaves the DPO term stuck at log 2) with
    one image per image placeholder, whose turns write no special token as text (`gates.check_turn_text`, given the
    `tokenizer`). Returns the kept prompts, the kept offline pairs (None: the trainer loads them itself) and the
    pre-flight record."""
    from ..data import load_split
    from ..trainers.upo_pairs import LINE_COLUMN

    record = {}
    if not stage_args.preflight:
        return dataset, None, record
    dataset, record["prompts_skipped"] = gates.check_reward_references(
        dataset, training_args.rewards, stage_args.dataset_name, allow_skip=stage_args.skip_bad_rows)
    offline = None
    if training_args.upo_mode in ("offline", "both") and training_args.upo_offline_dataset:
        name = f"{training_args.upo_offline_dataset} (train)"
        pairs = load_split(training_args.upo_offline_dataset, "train")
        # each row's line in the file, which the pairs' own messages name after rows are skipped here
        pairs = pairs.add_column(LINE_COLUMN, list(range(1, len(pairs) + 1)))
        gates.check_row_reasoning(pairs, name)
        gates.check_no_row_tools(pairs, name)  # rendered as the RL prompts are (`upo_pairs.render_prompt_text`)
        if tokenizer is not None:  # as the RL prompts and DPO's pairs
            gates.check_turn_text(tokenizer, pairs, name, model)
        offline, skipped = gates.check_preference_pairs(pairs, name, allow_skip=stage_args.skip_bad_rows)
        record["offline_pairs_skipped"] = len(skipped)
    return dataset, offline, record


def image_prompts(dataset, training_args, dataset_name: str, name: str | None = None):
    """Image prompts with decoded images, only those of the thinking mode `chat_template_kwargs` asks for or of none (GRPO
    renders all image prompts with one; see `UPOTrainer`). Relative image paths are read against `dataset_name`'s
    folder; `name` (default `dataset_name`) names the set in errors, e.g. with its split."""
    mode = (training_args.chat_template_kwargs or {}).get("enable_thinking")
    if mode is not None and "thinking" in dataset.column_names:
        # a row without a mode (null) is rendered in the one GRPO uses, as `UPOTrainer` takes it: kept in either mode
        dataset = dataset.filter(lambda thinking: thinking is None or bool(thinking) == bool(mode),
                                 input_columns="thinking")
        if len(dataset) == 0:
            raise UserError(f"upo: no image prompts with thinking={bool(mode)} (chat_template_kwargs.enable_thinking)")
    return vision.decode_images(dataset, data_folder(dataset_name), name or dataset_name)
