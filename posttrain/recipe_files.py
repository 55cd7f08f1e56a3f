"""Every file a recipe names exists, checked before any work: by `posttrain run --dry-run` and at the start of a run.

A recipe names files in four places: the stages' datasets (`dataset_name`, `upo_offline_dataset`, a curriculum
phase's `dataset_name`), the held-out `eval.dataset`, a `.jinja` chat template, and the data jobs' arguments (their
sources). `{data}/<name>` must be a dataset the recipe's `data:` section builds, and `{run}/<stage>` in a data job a
stage of the recipe that runs before the job (`after:`); other `{run}` and `{base}` paths appear during the run and
are not checked; `org/name` without a file suffix is a Hub id, which the stage loads itself.
"""

import re
from pathlib import Path

from .configs import StageArguments
from .data import folder_splits
from .errors import UserError
from .recipe import Recipe, resolve_relative
from .recipe_fields import STAGES

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".jinja", ".yaml", ".yml", ".txt")
STAGE_DATASET_KEYS = ("dataset_name", "upo_offline_dataset")
PLACEHOLDERS = ("{data}", "{run}", "{base}")


def check_recipe_files(recipe: Recipe) -> None:
    """Raise one `UserError` listing every missing file of `recipe`, each with the key that names it."""
    problems = []
    for stage, args in recipe.stages.items():
        named = [(f"stages.{stage}.{key}", args.get(key)) for key in STAGE_DATASET_KEYS]
        named += [(f"stages.{stage}.phases[{i}].dataset_name", phase.get("dataset_name"))
                  for i, phase in enumerate(args.get("phases") or []) if isinstance(phase, dict)]
        problems += [p for key, value in named if value for p in _dataset_problem(key, value, recipe)]
    if recipe.eval.dataset:
        problems += _dataset_problem("eval.dataset", recipe.eval.dataset, recipe)
    template = recipe.base.chat_template
    if template and template.endswith(".jinja") and not resolve_relative(template, recipe.path).is_file():
        problems.append(f"base.chat_template: file not found: {template}")
    for name, spec in recipe.data.items():
        for key, value in named_strings(spec, f"data.{name}"):
            problems += _path_problem(key, value, recipe, relative_to_recipe=True)
    problems += placeholder_problems(recipe) + order_problems(recipe) + stage_folder_problems(recipe)
    problems += split_problems(recipe)
    if problems:
        raise UserError(f"{recipe.path}: the recipe names files or data that do not exist, or do not exist yet when "
                        "read (checked before any work):\n  " + "\n  ".join(problems))


def placeholder_problems(recipe: Recipe) -> list[str]:
    """A misspelt placeholder at the start of a path (`{dta}/x`, `{Data}/x`, `{data/x`) is kept as text: the stage
    would look for it on the Hub, after the data jobs and the base evaluation."""
    sections = {"base": recipe.raw.get("base"), "eval": recipe.raw.get("eval"), "data": recipe.data,
                "shared": recipe.raw.get("shared"), "stages": recipe.raw.get("stages")}
    return [f"{key}: {value}: not a placeholder; expected {', '.join(PLACEHOLDERS)}"
            for section, spec in sections.items() for key, value in named_strings(spec, section)
            if re.match(r"{\w*[}/]", value) and not value.startswith(PLACEHOLDERS)]  # not text such as '{"a": 1}'


def order_problems(recipe: Recipe) -> list[str]:
    """`{data}/<name>` read by a stage (or by the base model's evaluation) before the stage its job runs `after:` has
    finished: the data would not exist yet when it is read."""
    order, problems = list(recipe.stages), []
    readers = [(f"stages.{stage}.{key}", args.get(key), stage, order[:i])
               for i, (stage, args) in enumerate(recipe.stages.items()) for key in STAGE_DATASET_KEYS]
    readers.append(("eval.dataset", recipe.eval.dataset, "the base model's evaluation", []))
    for key, value, reader, before in readers:
        if isinstance(value, str) and value.startswith("{data}/"):
            job = value[len("{data}/"):].split("/")[0]
            after = (recipe.data.get(job) or {}).get("after")
            if after and after not in before:
                problems.append(f"{key}: {value} is built after stage '{after}' (data.{job}.after), which does not "
                                f"run before {reader} ({' → '.join(order)})")
    return problems


def stage_folder_problems(recipe: Recipe) -> list[str]:
    """A data job that reads a stage's folder (`adapter_path: "{run}/sft"`) before that stage has run: without
    `after:` it runs before every stage. In a new run folder the job then fails with a bare "no adapter there"; in one
    an earlier chain of the recipe left that folder in, it silently samples from that stage's old adapter."""
    order, problems = list(recipe.stages), []
    for name, spec in recipe.data.items():
        after = spec.get("after")
        for key, value in named_strings(spec, f"data.{name}"):
            stage = value[len("{run}/"):].split("/")[0] if value.startswith("{run}/") else None
            if stage in STAGES and stage not in order:
                problems.append(f"{key}: {value} is stage {stage}'s folder, but the recipe has no stage {stage} "
                                f"(stages: {', '.join(order)})")
            elif stage in order and (after not in order or order.index(after) < order.index(stage)):
                when = f"after stage '{after}'" if after in order else f"before every stage (no data.{name}.after)"
                problems.append(f"{key}: {value} is written by stage {stage}, but the job runs {when}; add "
                                f"`after: {stage}` to data.{name}")
    return problems


def split_problems(recipe: Recipe) -> list[str]:
    """A split the dataset will not have (`eval.split: tset`): the base evaluation or the stage would find out after
    the data jobs. Known for `{data}/<name>` (the splits its job writes) and a local folder; a data file is one split
    under any name, and a Hub dataset is not looked up."""
    readers = [("eval.split", recipe.eval.dataset, recipe.eval.split)]
    for stage, args in recipe.stages.items():
        readers.append((f"stages.{stage}.dataset_train_split", args.get("dataset_name"),
                        args.get("dataset_train_split", StageArguments.dataset_train_split)))
        if stage == "dpo" or args.get("eval_strategy", "no") != "no":  # else never read (`common.load_test_split`)
            readers.append((f"stages.{stage}.dataset_test_split", args.get("dataset_name"),
                            args.get("dataset_test_split")))
        readers += _upo_readers(stage, args)
    problems = []
    for key, dataset, split in readers:
        if not (isinstance(dataset, str) and isinstance(split, str)):
            continue
        if dataset.startswith("{data}/") and "/" not in dataset[len("{data}/"):]:
            name = dataset[len("{data}/"):]
            have, holder = recipe.data_splits.get(name), f"its job {(recipe.data.get(name) or {}).get('job')} writes"
        else:
            have, holder = (folder_splits(Path(dataset)) if Path(dataset).is_dir() else None), "it has"
        if have is not None and split not in have:
            problems.append(f"{key}: '{split}' is not a split of {dataset} ({holder}: {', '.join(have)})")
    return problems


def _upo_readers(stage: str, args: dict) -> list[tuple]:
    """UPO's other splits: the offline pairs' `train` (read with `upo_mode` offline or both,
    `stages.upo_prompts.preflight_data`) and each curriculum phase's own prompt set (its `split`, else the stage's train
    split, `stages.upo_prompts.curriculum`)."""
    readers = []
    if args.get("upo_mode") in ("offline", "both"):
        readers.append((f"stages.{stage}.upo_offline_dataset (its train split)", args.get("upo_offline_dataset"),
                        "train"))
    train_split = args.get("dataset_train_split", StageArguments.dataset_train_split)
    for index, phase in enumerate(args.get("phases") or []):
        if isinstance(phase, dict) and "dataset_name" in phase:
            readers.append((f"stages.{stage}.phases[{index}].split", phase["dataset_name"],
                            phase.get("split", train_split)))
    return readers


def named_strings(value, key: str):
    """(key, string) for every string in a nest of dicts and lists, keyed like `data.mix.sources[0]`."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from named_strings(item, f"{key}[{index}]")
    elif isinstance(value, dict):
        for sub, item in value.items():
            yield from named_strings(item, f"{key}.{sub}")


def _dataset_problem(key: str, value: str, recipe: Recipe) -> list[str]:
    """A dataset is a folder, a data file, `{data}/<job>` or a Hub id (`org/name`, no file suffix)."""
    if "{" in value or Path(value).suffix in FILE_SUFFIXES:
        return _path_problem(key, value, recipe, relative_to_recipe=False)
    if Path(value).is_dir():  # `data/x` is spelt like a Hub id, but the stage opens the folder (`data.load_split`)
        return []
    hub_id = len([part for part in value.split("/") if part]) == 2 == value.count("/") + 1 and value[0] not in "./"
    if hub_id:
        return _offline_hub_problem(key, value)
    return [f"{key}: no such folder or data file: {value} (expected a folder, a .jsonl/.json/.parquet/.csv file, "
            "{data}/<name> or a Hub id org/name)"]


def _offline_hub_problem(key: str, repo_id: str) -> list[str]:
    """Offline, a Hub dataset that nothing cached would stop its stage only when it starts, after the stages before
    it: refused here unless the Hub's cache or datasets' own cache holds something of it (which may load)."""
    from .models.load import datasets_offline

    if not datasets_offline():
        return []
    from datasets import config
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
        return []
    except LocalEntryNotFoundError:
        pass
    if (Path(config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).exists():
        return []
    return [f"{key}: dataset '{repo_id}' is not in the local Hugging Face cache and offline mode is on "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it where there is network (hf download {repo_id} "
            "--repo-type dataset) or name a local folder or data file"]


def _path_problem(key: str, value: str, recipe: Recipe, relative_to_recipe: bool) -> list[str]:
    if value.startswith("{data}/"):
        built = value[len("{data}/"):].split("/")[0]
        if built not in recipe.data:
            return [f"{key}: {value} refers to data '{built}', which no job in the recipe's data: section builds "
                    f"(it builds: {', '.join(recipe.data) or 'nothing'})"]
        return []
    if "{" in value or Path(value).suffix not in FILE_SUFFIXES:
        return []  # a run-time path ({run}, {base}) or not a file name at all
    found = resolve_relative(value, recipe.path) if relative_to_recipe else Path(value)
    return [] if found.exists() else [f"{key}: file not found: {value}"]
