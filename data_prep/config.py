"""Configuration of the data-prep jobs: one dataclass per job, a flat YAML whose keys are its fields, CLI overrides.

We parse with plain `argparse` rather than TRL's `TrlParser`: importing `trl` costs ~6 s and ~400 MB before a data job
has read one row, and `sources` is a list of mappings that `HfArgumentParser` cannot express as flags.
"""

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import signal
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain import skip_final_collection
from posttrain.configs import check_minimum
from posttrain.datajobs import COMMAND_ENV, ERROR_ENV
from posttrain.errors import Terminated, UserError, disk_full_error, is_disk_full, terminate_on_sigterm
from posttrain.recipe import REPOSITORY
from posttrain.typecheck import check_type, field_types, literal_choices

from .registry import load_entry, split_spec

ON_ERROR = ("fail", "skip")


@dataclass
class SourceConfig:
    """One input of a job. In YAML a source is a path string or a mapping with these keys."""

    path: str | None = field(default=None, metadata={"help": "Data file (jsonl, json, parquet, csv), `save_to_disk` "
                                                            "folder, or Hub id."})
    dataset_info: str | None = field(default=None, metadata={"help": "A LLaMA-Factory dataset_info.json: read its "
                                                                    "dataset `name` (file, formatting, columns, tags)."})
    format: str = field(default="auto", metadata={"help": "Input format; `auto` detects it from the keys of the rows."})
    weight: float = field(
        default=1.0,
        metadata={"help": "Share of this source's rows in the mix: 0.5 keeps a seeded half, 2.0 repeats every row twice."},
    )
    name: str | None = field(default=None, metadata={"help": "Name in the data card; defaults to the file stem."})
    license: str = field(default="unknown", metadata={"help": "License of the data, copied into the data card."})
    split: str = field(default="train", metadata={"help": "Split to read from a `save_to_disk` folder or a Hub id."})
    subset: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    notes: str | None = field(default=None, metadata={"help": "Free text for the data card (provenance, caveats)."})

    def __post_init__(self):
        if self.dataset_info:
            if not self.name:
                raise UserError(f"source with dataset_info {self.dataset_info}: give the dataset's `name` in it")
            entry = load_entry(self.dataset_info, self.name)  # checked now: a typo fails before any build
            self.path = self.path or entry.path
        if not self.path:
            raise UserError(f"source {self.name or ''}: no 'path' (or `dataset_info` and `name`)")
        self.path = shipped_path(self.path)
        if self.name is None:
            self.name = Path(self.path).stem if Path(self.path).suffix else self.path.rstrip("/").split("/")[-1]
        if not self.weight > 0:
            raise UserError(f"source '{self.name}': weight must be > 0, got {self.weight}")
        facts = sidecar_facts(self.path)
        if self.license == "unknown":
            self.license = str(facts.get("license", self.license))
        if self.notes is None:
            self.notes = facts.get("notes")
        if self.notes is None and self.dataset_info:
            self.notes = f"dataset '{self.name}' of the LLaMA-Factory registry {self.dataset_info}"


def shipped_path(path: str) -> str:
    """`path` as given where it exists from here (or nowhere: a Hub id), else the repository's (the installed
    package's) file, as a recipe's paths fall back to it (`posttrain.recipe.resolve_relative`): the README's
    `data_prep/sources/...` sources from any folder."""
    if Path(path).expanduser().exists():
        return path
    found = REPOSITORY / Path(path).expanduser()
    return str(found.resolve()) if found.exists() else path


def sidecar_facts(path: str) -> dict:
    """`license`/`notes` from the YAML front matter of `<data file>.md` beside a data file, if there is one.

    Lets a committed source (e.g. `data_prep/sources/hhh_alignment.jsonl`) carry its license into every data card
    without each recipe repeating it.
    """
    sidecar = Path(path).with_suffix(".md")
    if not Path(path).suffix or not sidecar.is_file():
        return {}
    text = sidecar.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    facts = yaml.safe_load(text[4:text.index("\n---", 4)])
    return facts if isinstance(facts, dict) else {}


@dataclass
class DataJobConfig:
    """Options shared by every build job: where data comes from, how it is cleaned, mixed, split and written."""

    sources: list = field(
        default_factory=list,
        metadata={"help": "Inputs: paths, or mappings with path/format/weight/name/license/split/subset/notes "
                          "(or dataset_info + name). On the command line: paths, REGISTRY.json:NAME, or JSON objects."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder to write (train.parquet, test.parquet, "
                                                                   "README.md, card.json, rejects.jsonl)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace `output_dir` if it exists and a data job wrote "
                                                             "it (it holds card.json)."})
    on_error: str = field(default="fail", metadata={"help": "Bad rows: `fail` stops at the first, `skip` writes "
                                                            "them to rejects.jsonl and goes on."})
    test_size: float = field(default=0.05, metadata={"help": "Held-out split: a fraction (< 1) or a row count (>= 1); "
                                                             "0 writes train.parquet only."})
    seed: int = field(default=42, metadata={"help": "Seed of the mixing, shuffling and splitting."})
    dedup: bool = field(default=True, metadata={"help": "Drop exact duplicates (case, spacing and Unicode form "
                                                        "normalised)."})
    near_dup_threshold: float | None = field(default=0.85, metadata={"help": "Jaccard similarity (MinHash + LSH) at "
                                                                            "or above which a row is a near-duplicate; "
                                                                            "null disables."})
    near_dup_ngram: int = field(default=5, metadata={"help": "Word n-gram size of the MinHash shingles."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations (precision vs. speed)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (folder or Hub id) that measures lengths "
                                                                  "for the token filters and the histogram."})
    min_tokens: int | None = field(default=None, metadata={"help": "Drop rows shorter than this (needs `tokenizer`)."})
    max_tokens: int | None = field(default=None, metadata={"help": "Drop rows longer than this (needs `tokenizer`): "
                                                                   "the trainer would truncate them."})
    decontaminate: list[str] = field(default_factory=list, metadata={"help": "Evaluation sets (files in any "
                                                                             "supported format) whose n-grams must "
                                                                             "not appear."})
    decontam_ngram: int = field(default=13, metadata={"help": "Word n-gram size of the decontamination check."})
    max_row_bytes: int = field(default=2_000_000, metadata={"help": "Rows of a text source (JSON Lines, JSON, CSV) "
                                                                    "larger than this are errors (a runaway generation "
                                                                    "or a broken export); parquet files and saved "
                                                                    "datasets are not checked."})
    check_images: bool = field(default=True, metadata={"help": "Open every image with PIL to check it decodes."})
    num_proc: int | None = field(default=None, metadata={"help": "Worker processes for hashing and tokenizing; "
                                                                 "default: all cores on large sets, one on small."})

    def __post_init__(self):
        self.sources = [_as_source(s) for s in self.sources]
        if self.on_error not in ON_ERROR:
            raise UserError(f"on_error must be one of {', '.join(ON_ERROR)}, got '{self.on_error}'")
        if (self.min_tokens or self.max_tokens) and not self.tokenizer:
            raise UserError("min_tokens/max_tokens count tokens: set `tokenizer` (a folder or Hub id) too")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            raise UserError(f"near_dup_threshold must be in (0, 1] or null, got {self.near_dup_threshold}")
        if self.test_size < 0:
            raise UserError(f"test_size must be >= 0, got {self.test_size}")
        counts = {"near_dup_ngram": self.near_dup_ngram, "num_perm": self.num_perm,
                  "decontam_ngram": self.decontam_ngram, "max_row_bytes": self.max_row_bytes, "num_proc": self.num_proc}
        for name, value in counts.items():
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")


@dataclass
class SFTSetConfig(DataJobConfig):
    """Options of `build_sft_set`: instruction sources to `messages`."""


@dataclass
class PreferenceSetConfig(DataJobConfig):
    """Options of `build_preference_set`: preference sources to `prompt/chosen/rejected`."""

    min_score_margin: float = field(default=1.0, metadata={"help": "Rated data: keep the best/worst pair only when "
                                                                    "their scores differ by at least this."})
    unpaired: bool = field(default=False, metadata={"help": "Write `prompt/completion/label` rows (KTO): pairs become "
                                                            "a True and a False row. Automatic when every source "
                                                            "is unpaired."})


@dataclass
class PromptSetConfig(DataJobConfig):
    """Options of `build_prompt_set`: RL prompts with reference answers to `prompt/answer/domain`."""

    # the same options as every job's, whose help names train.parquet: this job's training split is `prompts`
    output_dir: str | None = field(default=None, metadata={"help": "Folder to write (prompts.parquet, test.parquet, "
                                                                   "README.md, card.json, rejects.jsonl)."})
    test_size: float = field(default=DataJobConfig.test_size, metadata={
        "help": "Held-out split: a fraction (< 1) or a row count (>= 1); 0 writes prompts.parquet only."})
    system: str | None = field(default=None, metadata={"help": "System turn put before every prompt that has none "
                                                               "of its own (nor a `system` column)."})
    thinking: bool | None = field(default=None, metadata={"help": "Thinking mode of every prompt (the `thinking` "
                                                                 "column the chat template and think_format read); "
                                                                 "null keeps a row's own `thinking`, if any."})


def _as_source(value) -> SourceConfig:
    if isinstance(value, SourceConfig):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"source {value!r} is not valid JSON: {exc}") from None
    if isinstance(value, str):
        registry = split_spec(value)
        if registry and registry[1]:
            return SourceConfig(dataset_info=registry[0], name=registry[1])
        return SourceConfig(path=value)
    if isinstance(value, dict):
        types = field_types([SourceConfig])
        _check_keys(value, set(types), "unknown source key")
        if "path" not in value and "dataset_info" not in value:
            raise UserError(f"source {value} has no 'path' (or `dataset_info` and `name`)")
        name = value.get("name") or value.get("path") or value.get("dataset_info")
        return SourceConfig(**{k: check_type(v, types[k], f"source {name!r}: {k}") for k, v in value.items()})
    raise UserError(f"a source is a path or a mapping with a 'path' key, got {type(value).__name__}: {value!r}")


def _check_keys(given: dict, known: set, what: str):
    """Unknown keys are errors, with the closest known key as a hint: a typo must not silently use a default."""
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise UserError(f"{what} '{key}'{hint}")


def _flag_type(annotation):
    """The argparse `type`/`nargs` of a field: bool takes true/false, lists take several values, Optionals take null."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if annotation in (list, dict) or typing.get_origin(annotation) in (list, dict):  # a dict as `key=value` items
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else str
        return {"nargs": "*", "type": item if item in (int, float) else str}
    if annotation is bool:
        return {"type": _parse_bool, "nargs": "?", "const": True}
    choices = literal_choices(annotation)
    if choices:
        return {"choices": choices}
    return {"type": lambda text, cast=annotation: None if text.lower() in ("null", "none") else cast(text)}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def make_parser(config_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with `--config FILE.yaml` and one `--<field>` flag per field of `config_cls`.

    `parser.dataclass_types` names the config class, as on `HfArgumentParser`, so tools that validate recipes
    (`data_prep.jobs`) can list a job's options.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.dataclass_types = [config_cls]
    parser.add_argument("--config", help="YAML file whose keys are the options below; flags override it.")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help"),
                            **_flag_type(hints[f.name]))
    return parser


def parse_config(config_cls: type, parser: argparse.ArgumentParser, argv: list[str] | None,
                 needs_sources: bool = True):
    """Build `config_cls` from `--config` YAML (keys must be fields) with the flags given in `argv` on top.

    `needs_sources=False` is for generators, which have no input files."""
    args = vars(parser.parse_args(argv))
    values = {}
    config_file = args.pop("config", None)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of options, got {type(values).__name__}")
        _check_keys(values, {f.name for f in dataclasses.fields(config_cls)}, f"{path}: unknown option")
        values = checked_values(values, config_cls, f"{path}: ")
    values.update(checked_values(args, config_cls, "--"))
    if needs_sources and not values.get("sources"):
        raise UserError("no sources: give `sources:` in the YAML or --sources PATH ...")
    if not values.get("output_dir"):
        raise UserError("no output folder: give `output_dir:` in the YAML or --output_dir DIR")
    return config_cls(**values)


def checked_values(values: dict, config_cls: type, where: str) -> dict:
    """`values` checked against the fields' annotations and their `"min"` (a count the job cannot use: `n_train: -1`
    would write no training rows), for the job's YAML and flags and a recipe's `data:` section
    (`jobs.check_data_section`); a single path or mapping where a list is expected (`sources: data.jsonl`) is a list
    of one."""
    types = field_types([config_cls])
    checked = {}
    for key, value in values.items():
        is_list = types[key] is list or typing.get_origin(types[key]) is list
        if is_list and isinstance(value, (str, dict)):
            value = [value]
        checked[key] = check_type(value, types[key], f"{where}{key}")
    check_minimum(config_cls, checked, where, sep="")
    return checked


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, for the data card (a recipe's job: the one posttrain sets, as its
    `--config` is a temporary file gone once the job ends)."""
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    argv = sys.argv[1:] if argv is None else argv
    return " ".join([prog, *(shlex.quote(part) for part in argv)])


def run(main) -> None:
    """`python -m data_prep.<job>` entry: user mistakes and a full disk print as one line, not a traceback.

    SIGTERM becomes a KeyboardInterrupt, as Ctrl-C is, so that either unwinds the job: the hidden `.OUT.*.partial`
    folder and the `posttrain-data-*` work folder are removed on the way out (the default SIGTERM action would end
    the process on the spot and leave both)."""
    skip_final_collection()
    terminate_on_sigterm()
    os.register_at_fork(after_in_child=_worker_signals)
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Exception) as exc:
        stop = _interruption(exc)
        if stop is not None:
            print("interrupted: nothing half-written is left; run the same command again", file=sys.stderr)
            sys.exit(128 + stop.signum if isinstance(stop, Terminated) else 130)
        if not (isinstance(exc, UserError) or is_disk_full(exc)):
            raise
        error = exc if isinstance(exc, UserError) else disk_full_error(exc, "the data job's files", resumes=False)
        print(f"error: {error}", file=sys.stderr)
        if os.environ.get(ERROR_ENV):  # a recipe's job: the run records this, not what stderr printed after it
            Path(os.environ[ERROR_ENV]).write_text(str(error), encoding="utf-8")
        sys.exit(2)


def _worker_signals() -> None:
    """In a forked worker (datasets' map pool, its queue manager): the job stops its workers as it unwinds, so Ctrl-C
    is left to it (no traceback from each worker), and SIGTERM from the pool kills as by default (raising instead, in
    the middle of the pool's queue locks, hangs its teardown and the job with it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind `exc`: a library's clean-up code may raise an error of its own while one unwinds
    it (datasets' worker pool raises TimeoutError from its `finally`)."""
    while exc is not None and not isinstance(exc, KeyboardInterrupt):
        exc = exc.__context__
    return exc
