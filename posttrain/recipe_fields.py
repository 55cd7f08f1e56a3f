"""What a recipe may say: its top-level keys, the keys each stage takes (TRL's config fields, ours, PEFT's; the table
kept in the cache, as importing TRL is slow), and the keys it may not set (the pipeline's, secrets, quantization)."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .configs import CurriculumArguments, EvalArguments, StageArguments
from .io import write_json
from .typecheck import annotation_from_json, annotation_to_json, field_types

STAGES = ("sft", "dpo", "upo")


TOP_KEYS = {"name", "modality", "base", "data", "eval", "shared", "stages", "accelerate_config", "description",
            "ablation"}


TOP_TYPES = {"name": str, "modality": str, "description": str, "accelerate_config": str | None}


# A run's folder is OUTPUT_DIR/<name>: one plain folder name, never a path that leaves OUTPUT_DIR.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


# Values TRL, PEFT or torch refuse only when the stage starts (after the data jobs, the base evaluation and the stages
# before it), with an error the run reports as a bug: checked with the recipe.
STAGE_MINIMUMS = {"learning_rate": 0, "lora_r": 1, "per_device_train_batch_size": 1}


# Set by the pipeline for each stage; a recipe that sets them would silently be overridden, so it is an error.
RESERVED = {"model_name_or_path", "output_dir", "adapter_path", "tokenizer_name_or_path", "resume_from_checkpoint",
            "eval_dataset", "trust_remote_code", *(f"eval_{f.name}" for f in dataclasses.fields(EvalArguments))}


# Secrets: the recipe is copied into the run folder, each stage's resolved.yaml, the report and the exported model card
# (pushed to the Hub), so a token written here would be published with them; the Trainer finds HF_TOKEN itself.
SECRETS = {"hub_token"}


# A URL with its user and password in it (`http://user:pass@host`, `https://TOKEN@host`): as public as a token would be
URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*@")


# TRL's ModelConfig quantization (QLoRA) fields: posttrain loads the base model itself and merges LoRA into its weights
# for evaluation, rollouts and export, which a 4/8-bit base cannot take, so they are refused rather than ignored.
QUANTIZATION = {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"}


# The upstream files that define the keys of the stages (TRL's configs, transformers' TrainingArguments): the key
# table is kept per their size and modification time too, so a table read from the cache is theirs
FIELD_SOURCES = {"trl": ("trl/trainer/base_config.py", "trl/trainer/sft_config.py", "trl/trainer/dpo_config.py",
                         "trl/trainer/grpo_config.py", "trl/trainer/model_config.py"),
                 "transformers": ("transformers/training_args.py",)}


def field_sources() -> list | None:
    """[file, size, mtime_ns] of each of `FIELD_SOURCES`, found without importing them; None where one is not found
    where the package's metadata puts it (an editable install, say)."""
    from importlib.metadata import PackageNotFoundError, distribution

    stamps = []
    for package, names in FIELD_SOURCES.items():
        try:
            dist = distribution(package)
        except PackageNotFoundError:
            return None
        for name in names:
            path = Path(dist.locate_file(name))
            if not path.is_file():
                return None
            stat = path.stat()
            stamps.append([name, stat.st_size, stat.st_mtime_ns])
    return stamps


def stage_fields(stage: str, fresh: bool = False) -> tuple[dict[str, Any], bool]:
    """(name -> annotation of every key `stage` takes, whether that table may refuse a key). Importing TRL's config
    classes takes seconds (transformers, torch, peft) in a process that may need none of them (a typo, a finished
    run), so the table is kept in the cache folder, one file per installed TRL / transformers / PEFT / accelerate, per
    state of the files that define the keys (`field_sources`) and per version of our own argument classes. A table
    read from the cache where those files could not be found may be another version's: it may accept a key, and a
    key it refuses is checked against the classes (`fresh` reads the classes themselves and rewrites the file)."""
    from importlib.metadata import version

    from .models.load import cache_dir

    ours = [Path(__file__).with_name("configs.py"), Path(__file__).with_name("typecheck.py"),
            Path(__file__).parent / "trainers" / "upo_config.py"]
    sources = field_sources()
    key = json.dumps([stage, *(version(p) for p in ("trl", "transformers", "peft", "accelerate")),
                      *(hashlib.sha256(path.read_bytes()).hexdigest() for path in ours), sources])
    path = cache_dir() / "stage-fields" / f"{stage}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not fresh and path.is_file():
        try:
            table = {name: annotation_from_json(spec) for name, spec in json.loads(path.read_text()).items()}
            return table, sources is not None
        except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: a spec not a mapping
            pass  # unreadable: made again below
    fields = field_types(stage_dataclasses(stage))
    try:
        write_json(path, {name: annotation_to_json(kind) for name, kind in fields.items()}, default=None)
    except (OSError, TypeError):
        pass  # a read-only cache or a value JSON cannot hold: check from the classes every time
    return fields, True


def stage_dataclasses(stage: str) -> tuple[type, ...]:
    """The dataclasses whose fields make up the keys of `stage` (imports TRL lazily: it is slow to import)."""
    from trl import DPOConfig, ModelConfig, SFTConfig

    if stage == "sft":
        return (StageArguments, SFTConfig, ModelConfig)
    if stage == "dpo":
        return (StageArguments, DPOConfig, ModelConfig)
    if stage == "upo":
        from .trainers.upo_config import UPOConfig

        return (StageArguments, UPOConfig, ModelConfig, CurriculumArguments)
    raise KeyError(stage)
