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
import json
from dataclasses import dataclass, field
from pathlib import Path

from .configs import BaseModelArguments, EvalArguments, GateArguments, check_minimum
from .datajobs import check_data_section
from .errors import UserError
from .promotion import check_gate_spec
from .recipe_checks import check_stages
from .recipe_fields import RUN_NAME, TOP_KEYS, TOP_TYPES, URL_CREDENTIALS
from .recipe_yaml import apply_overrides, read_recipe
from .typecheck import check_type, field_types, suggest


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


# recipes/ (and data_prep/) lie beside the package in a clone and in site-packages (pyproject ships them)
REPOSITORY = Path(__file__).resolve().parent.parent
SHIPPED = REPOSITORY / "recipes"


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
    local = resolve_relative(base.model_name_or_path, path)
    if local.is_absolute() and local.is_dir():  # named from any folder: the stages, `eval` and `export` run elsewhere
        base = dataclasses.replace(base, model_name_or_path=str(local))
    if base.chat_template and base.chat_template.endswith(".jinja"):  # a template file beside the recipe
        base = dataclasses.replace(base, chat_template=str(resolve_relative(base.chat_template, path)))
    elif base.chat_template:
        _check_template_name(base.chat_template, where)
    evaluation = _build(EvalArguments, raw.get("eval") or {}, f"{where}: eval")  # eval.dtype: a `Precision`
    stages = check_stages(raw, where)
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
    for root in (Path.cwd(), recipe_path.parent, REPOSITORY):
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


