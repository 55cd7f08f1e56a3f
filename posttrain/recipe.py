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
import hashlib
import importlib.util
import io
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from .configs import (
    UPO_MODES,
    BaseModelArguments,
    CurriculumArguments,
    EvalArguments,
    GateArguments,
    StageArguments,
    annotation_from_json,
    annotation_to_json,
    check_minimum,
    check_type,
    check_upo_values,
    field_types,
    is_text,
    suggest,
)
from .console import console
from .datajobs import check_data_section
from .errors import UserError
from .io import write_json
from .promotion import check_gate_spec
from .rewards import check_reward_names

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


def stage_fields(stage: str, fresh: bool = False) -> tuple[dict[str, Any], bool]:
    """(name -> annotation of every key `stage` takes, whether it came from the cache). Importing TRL's config classes
    takes seconds (transformers, torch, peft) in a process that may need none of them (a typo, a finished run), so
    the table is kept in the cache folder, one file per installed TRL / transformers / PEFT / accelerate and per
    version of our own argument classes. `fresh` reads the classes themselves (and rewrites the file)."""
    from importlib.metadata import version

    from .models.load import cache_dir

    ours = [Path(__file__).with_name("configs.py"), Path(__file__).parent / "trainers" / "upo_config.py"]
    key = json.dumps([stage, *(version(p) for p in ("trl", "transformers", "peft", "accelerate")),
                      *(hashlib.sha256(path.read_bytes()).hexdigest() for path in ours)])
    path = cache_dir() / "stage-fields" / f"{stage}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not fresh and path.is_file():
        try:
            return {name: annotation_from_json(spec) for name, spec in json.loads(path.read_text()).items()}, True
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: made again below
    fields = field_types(stage_dataclasses(stage))
    try:
        write_json(path, {name: annotation_to_json(kind) for name, kind in fields.items()}, default=None)
    except (OSError, TypeError):
        pass  # a read-only cache or a value JSON cannot hold: check from the classes every time
    return fields, False


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
    gates: dict[str, GateArguments] = field(default_factory=dict)  # stage -> its promote gate (stages without: none)
    data_splits: dict[str, list[str] | None] = field(default_factory=dict)  # data: name -> the splits its job writes

    def fingerprint(self) -> str:
        return fingerprint(self.raw)


# recipes/ lies beside the package in a clone and in site-packages (pyproject ships it)
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


def fingerprint(raw: dict) -> str:
    """Short hash of a recipe's content (after overrides), recorded in each stage's lineage."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_recipe_path() -> Path:
    return SHIPPED / "text" / "smollm2-135m.yaml"


def recipe_file(path: str | Path | None) -> Path:
    """The recipe to read: the default one, the path as given, else a shipped recipe named as the README names it
    (`recipes/tiny/text.yaml`), so those commands work from any folder and from an installed package."""
    if not path:
        return default_recipe_path()
    path = Path(path)
    shipped = SHIPPED.parent / path
    return shipped if not path.exists() and not path.is_absolute() and shipped.is_file() else path


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the last one silently, and in a
    recipe that is two edits of one setting, of which the one further up looks like it applies."""

    def construct_mapping(self, node, deep=False):
        first, pairs = {}, node.value if isinstance(node, yaml.MappingNode) else []  # else the base class refuses
        for key_node in [key for key, _ in pairs if key.tag != "tag:yaml.org,2002:merge"]:  # `<<:` may be overridden
            key = self.construct_object(key_node, deep=True)
            earlier = first.setdefault(key, key_node) if isinstance(key, typing.Hashable) else key_node
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping (first on line {earlier.start_mark.line + 1})"
                    "; the second would silently win: keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: Path) -> dict:
    """The YAML of a recipe file; a UserError naming the file (and the line) when it is not UTF-8 or not YAML."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start}); "
                        "save the recipe as UTF-8") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML's errors then say `in "<path>", line 3`, not `in "<unicode string>"`
    try:
        raw = yaml.load(stream, Loader=RecipeLoader) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from exc
    _check_expanded_size(raw, path)
    return raw


MAX_RECIPE_VALUES = 100_000  # a real recipe has a few hundred


def _check_expanded_size(raw, path: Path) -> None:
    """Refuse a recipe whose YAML aliases repeat so much that it grows huge once written out: each `*alias` is one
    shared object when loaded, but the fingerprint, resolved.yaml and the report write every repeat (a 1 kB file of
    nested aliases is 10^9 values: minutes, then out of memory). Counted each time it is reached, and stopped early."""
    pending, seen = [raw], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise UserError(f"{path}: more than {MAX_RECIPE_VALUES:,} values once its YAML aliases (*name) are "
                            "expanded; a recipe this large is an alias bomb, not a recipe")
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


class ValueLoader(RecipeLoader):
    """A command-line value with YAML 1.2's plain scalars (int `10`, float `1e-4`, true/false, null, else a string):
    YAML 1.1 reads `010` as 8, `1:30` as 90, `yes` as true and `2024-01-01` as a date, which no one means there."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[1] not in
                                       ("bool", "int", "float", "timestamp")]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


for _kind, _pattern, _first, _make in (
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF", lambda text: text.lower() == "true"),
        ("int", r"[-+]?[0-9]+", "-+0123456789", int),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?", "-+.0123456789", float)):
    ValueLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_kind}", re.compile(f"^(?:{_pattern})$"), list(_first))
    ValueLoader.add_constructor(f"tag:yaml.org,2002:{_kind}",
                                lambda loader, node, make=_make: make(loader.construct_scalar(node)))


def parse_override(text: str, annotation):
    """An override's value for a field of `annotation` (None: unknown). The text as given for a text field (`1.10`,
    `exp #3`); else `ValueLoader`'s YAML, refusing a `#` comment, which YAML would drop with the text after it."""
    quoted = len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]
    if annotation is not None and is_text(annotation) and not quoted:
        return None if text in ("null", "~") and type(None) in typing.get_args(annotation) else text
    *_, last, _end = yaml.scan(text, Loader=ValueLoader)
    comment = text[last.end_mark.index:].strip()  # the scanner skips a comment: what is left after the last token
    if comment:
        raise ValueError(f"'{comment}' would be read as a YAML comment and dropped; quote the value if it is text "
                         f"(e.g. '\"{text}\"')")
    return yaml.load(text, Loader=ValueLoader)


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """`stages.sft.learning_rate=1e-4` style overrides (values: `parse_override`). A section the file leaves empty
    (`shared:` with nothing under it) takes overrides like one it fills."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' should look like section.key=value (e.g. stages.sft.max_steps=10)")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        node = raw
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise UserError(f"{where}: override '{item}': '{key}' is not a mapping")
        try:
            node[keys[-1]] = parse_override(value, override_type(keys, raw))
        except ValueError as exc:
            raise UserError(f"{where}: override '{item}': {exc}") from None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{where}: override '{item}': the value {value!r} is not valid YAML ({problem}); quote "
                            "strings and close brackets, e.g. shared.lora_target_modules=[q_proj,v_proj]") from exc
        if keys[0] == "shared" and len(keys) == 2:
            _warn_shadowed(raw, keys[1], item, where)
    return raw


def override_type(keys: list[str], raw: dict):
    """The annotation of the field an override sets: a top-level value, a key of `base:`, `eval:`, a gate or a stage
    (`shared.K`: text only if text in every stage that takes K); None for others (data jobs, ablation)."""
    if len(keys) == 1:
        return TOP_TYPES.get(keys[0])
    section, key = keys[0], keys[-1]
    if keys[-2] == "gate" and (section, len(keys)) in (("shared", 3), ("stages", 4)):
        return field_types((GateArguments,)).get(key)
    if section in ("base", "eval") and len(keys) == 2:
        return field_types((BaseModelArguments if section == "base" else EvalArguments,)).get(key)
    if section == "stages" and len(keys) == 3 and keys[1] in STAGES:
        return stage_fields(keys[1])[0].get(key)
    if section == "shared" and len(keys) == 2:
        stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
        kinds = [fields[key] for stage in STAGES if stage in stages or not stages
                 for fields in [stage_fields(stage)[0]] if key in fields]
        return kinds[0] if kinds and all(is_text(kind) for kind in kinds) else None
    return None


def _warn_shadowed(raw: dict, key: str, item: str, where: str) -> None:
    """Say so when stages set `key` themselves: a `shared.K` override does not reach them."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    if own := [stage for stage, args in stages.items() if isinstance(args, dict) and key in args]:
        effect = "so it changes nothing" if len(own) == len(stages) else "so it does not reach them"
        console.print(f"[yellow]warning:[/yellow] {escape(where)}: override '{escape(item)}': stage(s) "
                      f"{', '.join(own)} set {key} themselves, {effect}; override stages.<stage>.{key} instead")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> Recipe:
    """Read, override and validate a recipe; raise `UserError` naming file, stage and key on any problem.

    `raw` gives the recipe's content directly (a variant derived in memory); `path` then only anchors relative paths.
    """
    path = recipe_file(path)
    if raw is None:
        if not path.is_file():
            raise UserError(f"recipe not found: {path}")
        raw = read_recipe(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {sorted(TOP_KEYS)}")
    raw = apply_overrides(raw, overrides or [], str(path))
    where = str(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown top-level key(s) {sorted(unknown)}; expected some of {sorted(TOP_KEYS)}")
    _check_credentials(raw, "", where)
    for key in ("name", "base", "stages"):
        if key not in raw:
            raise UserError(f"{where}: missing required key '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{where}: name: {name!r} cannot name the run's folder (OUTPUT_DIR/<name>); use letters, "
                        "digits, '.', '_' and '-', e.g. smollm2-135m")
    modality = raw.get("modality", "text")
    if modality not in ("text", "vision"):
        raise UserError(f"{where}: modality: '{modality}' is not one of text, vision")
    base = _build(BaseModelArguments, raw["base"], f"{where}: base")
    if base.chat_template and base.chat_template.endswith(".jinja"):  # a template file beside the recipe
        base = dataclasses.replace(base, chat_template=str(resolve_relative(base.chat_template, path)))
    elif base.chat_template:
        _check_template_name(base.chat_template, where)
    evaluation = _build(EvalArguments, raw.get("eval") or {}, f"{where}: eval")  # eval.dtype: a `Precision`
    stages = _check_stages(raw, where)
    stages = {stage: _found_datasets(args, path) for stage, args in stages.items()}
    if evaluation.dataset:
        evaluation = dataclasses.replace(evaluation, dataset=_found(evaluation.dataset, path))
    gates = _gates(raw, list(stages), where)
    data = raw.get("data") or {}
    for data_name in data if isinstance(data, dict) else ():  # built into <run>/data/<name>, replacing what is there
        if not isinstance(data_name, str) or not RUN_NAME.fullmatch(data_name) or data_name in (".", ".."):
            raise UserError(f"{where}: data: {data_name!r} cannot name a data set's folder (<run>/data/<name>); use "
                            "letters, digits, '.', '_' and '-', e.g. verifiable")
    data_splits = check_data_section(data, where, list(stages))
    accelerate_config = check_type(raw.get("accelerate_config"), TOP_TYPES["accelerate_config"],
                                   f"{where}: accelerate_config")
    if accelerate_config is not None:
        accelerate_config = str(resolve_relative(accelerate_config, path))
        if not Path(accelerate_config).is_file():
            raise UserError(f"{where}: accelerate_config: file not found: {accelerate_config}")
    return Recipe(name=name, path=path, modality=modality, base=base, data=data, eval=evaluation,
                  stages=stages, accelerate_config=accelerate_config, raw=raw, gates=gates, data_splits=data_splits)


def _check_credentials(value, key: str, where: str) -> None:
    """No value of the recipe is a URL with credentials in it: the recipe is copied where `SECRETS` would be."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_credentials(item, f"{key}.{name}" if key else str(name), where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_credentials(item, f"{key}[{index}]", where)
    elif isinstance(value, str) and URL_CREDENTIALS.match(value.strip()):
        raise UserError(f"{where}: {key}: the URL carries credentials (user:password@); a recipe is copied into the "
                        "run folder, each stage's resolved.yaml, the report and the model card, so they would be "
                        "published with them. Give the URL without them and put them in ~/.netrc (`machine HOST "
                        "login USER password PASSWORD`), which requests, and so TRL's vLLM client, reads")


def _check_template_name(name: str, where: str) -> None:
    """A chat template that is not a `.jinja` file (`check_recipe_files` finds those) is a built-in name or a file:
    a misspelt name stopped the run at the base step, after resolving (downloading) the base model."""
    from .models.templates import CHAT_TEMPLATES, chat_template_text

    try:
        chat_template_text(name)
    except UserError as exc:
        builtins = [path.stem for path in CHAT_TEMPLATES.glob("*.jinja")]
        raise UserError(f"{where}: base.chat_template: {exc}{suggest(name, builtins)}") from None


def resolve_relative(value: str, recipe_path: Path) -> Path:
    """A path in a recipe: as given if it exists, else relative to the recipe's folder, else to the repository. `~/x`
    is in the home folder, as for `base.model_name_or_path` and inside the data jobs."""
    candidate = Path(value).expanduser()
    for root in (Path.cwd(), recipe_path.parent, Path(__file__).resolve().parent.parent):
        if (root / candidate).exists():
            return (root / candidate).resolve()
    return candidate


def _found(value, recipe_path: Path):
    """A dataset path that is not there from the working directory, found beside the recipe (or in the repository)
    as README promises; one found from here, a Hub id or a `{data}` path stays as written."""
    if not isinstance(value, str) or "{" in value or Path(value).exists():
        return value
    found = resolve_relative(value, recipe_path)
    return str(found) if found.is_absolute() else value


def _found_datasets(args: dict, recipe_path: Path) -> dict:
    """A stage's dataset paths (`dataset_name`, `upo_offline_dataset`, a phase's `dataset_name`) through `_found`."""
    args = {**args, **{key: _found(args[key], recipe_path) for key in ("dataset_name", "upo_offline_dataset")
                       if key in args}}
    if isinstance(args.get("phases"), list):
        args["phases"] = [{**phase, "dataset_name": _found(phase.get("dataset_name"), recipe_path)}
                          if isinstance(phase, dict) and "dataset_name" in phase else phase for phase in args["phases"]]
    return args


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
            raise UserError(f"{where}: stages: '{stage}' is not a stage; the stages are {', '.join(STAGES)}, each at "
                            "most once, under its own name (SFT on two datasets: one data job building a set from "
                            "both, e.g. build_sft_set with two sources)")
        args = args or {}
        if not isinstance(args, dict):
            raise UserError(f"{where}: stages.{stage}: expected a mapping of argument names to values")
        fields, cached = stage_fields(stage)
        try:
            _check_keys(stage, {"shared": shared, f"stages.{stage}": args}, fields, where)
        except UserError:
            if not cached:
                raise
            # only the classes themselves reject a key: an out-of-date table must not refuse a valid one
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
        check_reward_names(rewards or {})
    except UserError as exc:
        raise UserError(f"{where}: {origin('rewards')}.rewards: {exc}") from None
    if "upo_mode" in args and args["upo_mode"] not in UPO_MODES:
        raise UserError(f"{where}: {origin('upo_mode')}.upo_mode: {args['upo_mode']!r}; expected one of: "
                        f"{', '.join(UPO_MODES)}")
    if stage == "upo":
        try:
            check_upo_values(args)
        except UserError as exc:
            raise UserError(f"{where}: stages.upo: {exc}") from None


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


def _gates(raw: dict, stages: list[str], where: str) -> dict[str, GateArguments]:
    """Each stage's promote gate: its own `gate:`, else `shared.gate`; `gate: null` turns it off for one stage."""
    shared = raw.get("shared") or {}
    gates = {}
    for stage in stages:
        args = raw["stages"][stage] or {}
        origin = f"stages.{stage}.gate" if "gate" in args else "shared.gate"
        spec = args["gate"] if "gate" in args else shared.get("gate")
        if spec is None or spec is False:
            continue
        gates[stage] = check_gate_spec(_build(GateArguments, spec, f"{where}: {origin}"), f"{where}: {origin}")
    return gates


def _build(cls, mapping, where: str):
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping")
    fields = field_types((cls,))
    values = {}
    for key, value in mapping.items():
        if key not in fields:
            raise UserError(f"{where}.{key}: unknown key{suggest(key, fields)}")
        values[key] = check_type(value, fields[key], f"{where}.{key}")  # as the field takes it: '5e-2' a float
    check_minimum(cls, values, where)
    try:
        return cls(**values)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from exc


