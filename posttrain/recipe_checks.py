"""A recipe's stages checked before anything runs: known stage names, keys each stage takes, values in range and of
the right type, the LoRA shape the same in every stage that continues one adapter, packages an option needs."""

import dataclasses
import importlib.util

from rich.markup import escape

from .configs import UPO_MODES, StageArguments, check_upo_values
from .console import console
from .errors import UserError
from .recipe_fields import QUANTIZATION, RESERVED, SECRETS, STAGE_MINIMUMS, STAGES, stage_fields
from .rewards import check_reward_names
from .typecheck import check_type, suggest


def check_stages(raw: dict, where: str) -> dict[str, dict]:
    stages = raw["stages"]
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{where}: stages: expected a mapping of stage name to arguments (sft, dpo, upo)")
    shared = raw.get("shared") or {}
    if not isinstance(shared, dict):
        raise UserError(f"{where}: shared: expected a mapping of argument names to values")
    merged = {}
    for stage, args in stages.items():
        if stage not in STAGES:
            raise UserError(f"{where}: stages: '{stage}' is not a stage; the stages are {', '.join(STAGES)}, each at "
                            "most once, under its own name (SFT on two datasets: one data job building a set from "
                            "both, e.g. build_sft_set with two sources)")
        args = args or {}
        if not isinstance(args, dict):
            raise UserError(f"{where}: stages.{stage}: expected a mapping of argument names to values")
        fields, settled = stage_fields(stage)
        try:
            _check_keys(stage, {"shared": shared, f"stages.{stage}": args}, fields, where)
        except UserError:
            if settled:
                raise
            # a table that may be another version's does not refuse a key: the classes themselves decide
            _check_keys(stage, {"shared": shared, f"stages.{stage}": args}, stage_fields(stage, fresh=True)[0], where)
        merged[stage] = {k: v for k, v in {**shared, **args}.items() if k != "gate"}
        _check_values(stage, merged[stage], args, where)
        _check_adapter_shape(stage, merged, args, where)
    return merged


# What a LoRA adapter is made with: a stage after the first continues the adapter it is given and never reads these
ADAPTER_SHAPE = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora",
                 "lora_task_type", "lora_top_layers")


def _check_adapter_shape(stage: str, merged: dict[str, dict], own: dict, where: str) -> None:
    """A later stage's own LoRA settings would be silently ignored (it continues the first stage's adapter, e.g.
    `stages.dpo.use_dora: true` trained no DoRA): an error unless they are the first stage's."""
    first = next(iter(merged))
    if stage == first:
        return
    for key in ADAPTER_SHAPE:
        if key in own and own[key] != merged[first].get(key):
            there = f"{key}: {merged[first][key]!r} there" if key in merged[first] else f"{key} not set there"
            raise UserError(f"{where}: stages.{stage}.{key}: {own[key]!r}, but {stage} continues the adapter that "
                            f"{first} creates ({there}), so it would be ignored; set it under shared or "
                            f"stages.{first}")


# Settings whose package a trainer imports only when it is built (for UPO: after the data, SFT and DPO):
# key -> (module, package, how to install it, what removing the key leaves)
NEEDS_PACKAGE = {
    "use_liger_kernel": ("liger_kernel", "liger-kernel", "pip install liger-kernel, for a GPU", ""),
    "use_vllm": ("vllm", "vLLM", "pip install 'trl[vllm]'", " to sample with transformers' generate"),
}


def _check_values(stage: str, args: dict, own: dict, where: str) -> None:
    """What a stage would refuse only when it starts, maybe hours in, checked without TRL (seconds to import): our
    `StageArguments` (`loraplus_lr_ratio` >= 1), reward names, UPO's own values (`check_upo_values`). `own`: the
    stage's own section."""
    def origin(key: str) -> str:
        return f"stages.{stage}" if key in own else "shared"

    ours = {f.name for f in dataclasses.fields(StageArguments)}
    try:
        StageArguments(**{key: value for key, value in args.items() if key in ours})
    except UserError as exc:
        raise UserError(f"{where}: stages.{stage}: {exc}") from None
    for key, minimum in STAGE_MINIMUMS.items():
        if isinstance(args.get(key), (int, float)) and args[key] < minimum:
            raise UserError(f"{where}: {origin(key)}.{key}: {args[key]} is below the minimum of {minimum}")
    targets = args.get("lora_target_modules")
    if targets == "lm_head" or (isinstance(targets, list) and "lm_head" in targets):
        # TRL's trainers score through `lm_head.weight` directly and refuse a LoRA there, once the stage starts
        raise UserError(f"{where}: {origin('lora_target_modules')}.lora_target_modules: lm_head cannot take a LoRA "
                        "(TRL computes the log-probs from its weight directly, so the adapter would never train); "
                        "remove it, or train the head in full with lora_modules_to_save: [lm_head]")
    if args.get("lora_modules_to_save") and args.get("dtype") in ("bfloat16", "float16"):
        # PEFT keeps the full copies in the base's dtype (LoRA matrices go to float32), where an optimizer step below
        # the rounding step is lost: a norm's 1.0 stayed 1.0 through three stages at 1e-3 (`devices.speed_defaults`
        # avoids its own bf16 default so). A warning, not an error: larger updates, or weights near 0 (embeddings),
        # do train, and float32 copies of a large model's weights cost memory a user may not have
        console.print(f"[yellow]warning:[/yellow] {escape(where)}: {origin('lora_modules_to_save')}."
                      f"lora_modules_to_save with {origin('dtype')}.dtype: {args['dtype']}: PEFT trains those modules' "
                      f"full copies in {args['dtype']}, where updates smaller than its rounding step are lost (a norm's "
                      "weights of 1.0 may not move at all); dtype: float32 keeps them (bf16: true still trains under "
                      "bf16 autocast)")
    for key, (module, name, install, instead) in NEEDS_PACKAGE.items():
        if args.get(key) and importlib.util.find_spec(module) is None:
            raise UserError(f"{where}: {origin(key)}.{key}: true, but {name} is not installed; install it ({install}) "
                            f"or remove {key}{instead}")
    rewards = args.get("rewards")
    if rewards is not None and not isinstance(rewards, dict):
        raise UserError(f"{where}: {origin('rewards')}.rewards: {rewards!r}; expected reward names with their "
                        "weights, e.g. {accuracy: 1.0, think_format: 0.5}")
    try:
        if rewards is not None:
            check_reward_names(rewards)
    except UserError as exc:
        raise UserError(f"{where}: {origin('rewards')}.rewards: {exc}") from None
    _check_sampling(stage, args.get("train_sampling_strategy"), f"{where}: {origin('train_sampling_strategy')}")
    if "upo_mode" in args and args["upo_mode"] not in UPO_MODES:
        raise UserError(f"{where}: {origin('upo_mode')}.upo_mode: {args['upo_mode']!r}; expected one of: "
                        f"{', '.join(UPO_MODES)}")
    if stage == "upo":
        try:
            check_upo_values(args)
        except UserError as exc:
            raise UserError(f"{where}: stages.upo: {exc}") from None


def _check_sampling(stage: str, strategy: str | None, where: str) -> None:
    """`train_sampling_strategy` where the stage's trainer can use it (`where`: the file and section that set it)."""
    if stage == "dpo" and strategy in ("group_by_length", "batch_rebalance"):
        # transformers measures rows by their `input_ids`, which DPO's tokenized pairs do not have: a bare ValueError
        raise UserError(f"{where}.train_sampling_strategy: {strategy} does not work for DPO (its pairs have no "
                        "input_ids for transformers to measure); leave it out")
    if stage == "upo" and strategy not in (None, "random"):
        # GRPO draws its own prompt order (each prompt repeated num_generations times): the strategy did nothing
        raise UserError(f"{where}.train_sampling_strategy: {strategy} is not used by UPO (GRPO draws each prompt "
                        "num_generations times in its own order); leave it out, or set shuffle_dataset: false to take "
                        "the prompts in the file's order")


def _check_keys(stage: str, mappings: dict[str, dict], fields: dict, where: str) -> None:
    """Every key of `mappings` (where it came from -> keys and values) is a field of `stage` with a value of its type."""
    for origin, mapping in mappings.items():
        for key, value in list(mapping.items()):
            if key == "gate":  # not a stage argument: the pipeline applies it (`_gates`)
                continue
            if key in SECRETS:
                raise UserError(f"{where}: {origin}.{key}: a recipe is copied into the run folder, its report and the "
                                "model card; set the HF_TOKEN environment variable (or `hf auth login`) instead")
            if key in QUANTIZATION:
                raise UserError(f"{where}: {origin}.{key}: a 4/8-bit base model (QLoRA) is not supported; train the "
                                "LoRA over a bf16 base (dtype: bfloat16) or shard the model over several GPUs "
                                "(--accelerate-config recipes/accelerate/fsdp.yaml)")
            if key in RESERVED:
                raise UserError(f"{where}: {origin}.{key}: set by the pipeline for each stage; remove it "
                                "(the base model goes under `base:`)")
            if key not in fields:
                raise UserError(f"{where}: {origin}.{key}: unknown key for stage '{stage}'{suggest(key, fields)}")
            mapping[key] = check_type(value, fields[key], f"{where}: {origin}.{key}")
