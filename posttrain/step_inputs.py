"""What a run step's inputs are, beyond its arguments, so a rerun skips what is up to date and says what changed: the files
and data folders a data job reads (by content), Hub commits, reward sources, a stage's dataset paths as opened, and the
arguments that never count (where to log, save, evaluate)."""

from pathlib import Path

import yaml

from . import lineage
from .configs import EVAL_KEYS
from .recipe_files import STAGE_DATASET_KEYS, named_strings
from .reward_inputs import custom_reward_files
from .runs import in_run


def read_files(args) -> dict:
    """Content fingerprints of the local files and data_prep output folders among a data job's arguments (another
    job's output, a source file), so a job whose input was rebuilt or edited is rebuilt too: its arguments, being
    paths, stay the same. So is a tokenizer folder without weights (`{run}/base/tokenizer`, which `build_sft_set`
    renders and counts `max_tokens` with), by its tokenizer files: another chat template or base model writes other
    ones at the same path. Other folders (a model) are left out: hashing them would cost more than it tells, and a
    job that samples from a stage's adapter carries the stage's weights (`after`)."""
    reads = {}
    for _, value in named_strings(args, ""):
        path = Path(value)
        if path.is_file() or (path / "card.json").is_file():
            reads[value] = lineage.dataset_fingerprint(value)
        elif is_tokenizer_folder(path):
            reads[value] = lineage.tokenizer_digest(path)
    return reads


def is_tokenizer_folder(path: Path) -> bool:
    """A folder holding a tokenizer and no weights (`base/tokenizer`): a few small files, cheap to hash."""
    return (path / "tokenizer_config.json").is_file() and not any(path.glob("*.safetensors"))


def hub_commits(args) -> dict:
    """The commit `main` names in the local Hugging Face cache for each Hub model id among a data job's arguments (a
    job sampling from `org/name` itself rather than `{base}`, which is a snapshot folder): `main` moving on to other
    weights changes what the job samples from, not its arguments."""
    from huggingface_hub import constants

    commits = {}
    for _, value in named_strings(args, ""):
        ref = Path(constants.HF_HUB_CACHE) / f"models--{value.replace('/', '--')}" / "refs" / "main"
        if value.count("/") == 1 and not Path(value).exists() and ref.is_file():
            commits[value] = ref.read_text().strip()
    return commits


def reward_sources(rewards) -> dict[str, str]:
    """The fingerprint of each reward function of your own (by import path) among `rewards` ({name: weight}), by name:
    an edited reward trains UPO, and samples the on-policy pairs, again, as edited data does."""
    if isinstance(rewards, list):  # a data job's deprecated form, `[name, ...]` or `[name=weight, ...]` (`reward_mapping`)
        rewards = [str(item).split("=", 1)[0] for item in rewards]
    names = rewards if isinstance(rewards, (dict, list)) else {}
    return {name: lineage.dataset_fingerprint(source) for name, source in custom_reward_files(names).items()}


# stage arguments that only say when to log, save and report: changing them keeps a stage's finished adapter and its
# checkpoints (they are not part of `stage_hashes`)
NOT_TRAINING_KEYS = ("save_strategy", "save_steps", "save_total_limit", "logging_steps", "logging_first_step",
                     "logging_strategy", "logging_dir", "report_to")


# stage arguments that are never a stage's inputs: where it runs, what it is called, how it is evaluated
NOT_INPUT_KEYS = ("output_dir", "project", "run_name", *EVAL_KEYS)


def as_opened(args: dict, spell=lambda path: str(path.resolve())) -> dict:
    """A stage's arguments with each local dataset path as the stage opens it (absolute, from this folder): `data/x`,
    `./data/x`, its absolute path and the path found beside the recipe are one input, not four inputs hashes. A Hub
    id, or a path that is not there, stays as written. `spell`: how a local path is written (`by_content`)."""
    def opened(value):
        return spell(Path(value)) if isinstance(value, str) and Path(value).exists() else value

    args = {**args, **{key: opened(args[key]) for key in STAGE_DATASET_KEYS if key in args}}
    if isinstance(args.get("phases"), list):
        args["phases"] = [{**phase, "dataset_name": opened(phase["dataset_name"])}
                          if isinstance(phase, dict) and "dataset_name" in phase else phase for phase in args["phases"]]
    return args


def by_content(path: Path) -> str:
    """A local dataset in a stage's hash: the stage's `datasets` fingerprint is its content, so where the folder lies
    does not count (its absolute path would: a project moved or copied elsewhere with its data trained again)."""
    return "(local: its content)"


def changed_inputs(resolved: Path, args: dict, record: dict | None = None, now: dict | None = None) -> str:
    """What differs between a stage's arguments as an earlier run resolved them and `args`, for a message: `key: old →
    new` for up to four keys; with none, what else its lineage `record` says differs from `now` (`other_inputs`)."""
    before = yaml.safe_load(resolved.read_text()) if resolved.is_file() else {}
    if args.get("output_dir"):
        before = in_run(before, Path(args["output_dir"]).parent)
    before, args = as_opened(before), as_opened(args)
    ignored = {"resume_from_checkpoint", *NOT_INPUT_KEYS, *NOT_TRAINING_KEYS}
    keys = sorted(k for k in {*before, *args} - ignored if before.get(k) != args.get(k))
    if not keys:
        return other_inputs(record or {}, now or {})
    shown = [f"{k}: {before.get(k)!r} → {args.get(k)!r}" for k in keys[:4]]
    return "; ".join(shown) + (f"; {len(keys) - 4} more" if len(keys) > 4 else "")


def other_inputs(record: dict, now: dict) -> str:
    """Which inputs besides its arguments a stage's lineage `record` gives otherwise than `now` (`datasets`: key ->
    fingerprint; `base_hash`; `previous_inputs_hash`). Where it records none that differ, the posttrain that trained
    it (its `git_commit`) hashed the same inputs another way, or an input it does not record changed."""
    if not record:
        return "the data, the base model or the previous stage changed"
    found = [f"the data in {key} changed" for key, entry in (record.get("datasets") or {}).items()
             if isinstance(entry, dict) and key in now.get("datasets", {})
             and entry.get("fingerprint") != now["datasets"][key]]
    if record.get("base_hash") not in (None, now.get("base_hash")):
        found.append("the base model or its chat template changed")
    if record.get("previous_stage") and record.get("previous_inputs_hash") != now.get("previous_inputs_hash"):
        found.append(f"{record['previous_stage']} was trained again since")
    if found:
        return "; ".join(found)
    commit = str(record.get("git_commit") or "")[:7]
    return ("its arguments, data, base model and previous stage are as it recorded them: a reward's source file or a "
            "curriculum phase's prompts changed, or the posttrain that trained it"
            f"{f' (commit {commit})' if commit else ''} hashed its inputs another way")
