"""The data jobs by name: list them, check a recipe's `data:` section against their options, run one.

A job is a module `data_prep/<verb>.py` with `make_parser()` (a parser over its config dataclass) and
`main(argv) -> int`. posttrain never imports data_prep (the dependency goes one way, data_prep -> posttrain); it runs
this module in a child process, as it runs the stages:

    python -m data_prep.jobs list                    # JSON: {"jobs": [...], "tools": [...]}
    python -m data_prep.jobs check < section.json    # {"where", "stages", "data"}: a recipe's data section;
                                                     # prints JSON {dataset: the splits its job writes, or null}
    python -m data_prep.jobs JOB [ARGS ...]          # run JOB (`posttrain data JOB ...`, a recipe's data jobs)

User mistakes print as one line `error: ...` with exit code 2.
"""

import importlib
import json
import pkgutil
import sys

from posttrain.errors import UserError
from posttrain.typecheck import field_types, suggest

from .config import checked_values, run

# Reachable as `posttrain data <name>` but not builders a recipe's `data:` section runs: a check, and one-off
# extractors of the real-data snapshots committed under data_prep/sources/.
TOOLS = ("validate", "extract_hhh_alignment", "extract_chitchat")


def list_jobs() -> list[str]:
    """The builders a recipe's `data:` section can name."""
    package = sys.modules[__package__]
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name.startswith("_") or info.name in TOOLS:
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "make_parser") and hasattr(module, "main"):
            names.append(info.name)
    return sorted(names)


def load_job(job: str, where: str = "data job"):
    if job not in list_jobs() and job not in TOOLS:
        raise UserError(f"{where}: '{job}' is not a data_prep job; the jobs are: {', '.join(list_jobs())}")
    return importlib.import_module(f"{__package__}.{job}")


def check_data_section(data: dict, where: str, stages: list[str]) -> dict[str, list[str] | None]:
    """Raise a UserError naming the recipe, the dataset and the key for the first mistake in a `data:` section; else
    the splits each dataset's job writes (its `SPLITS`; None where the job does not say)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: data: expected a mapping of dataset name to a data_prep job and its arguments")
    splits = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or "job" not in spec:
            raise UserError(f"{where}: data.{name}: expected a mapping with a 'job' key (e.g. build_verifiable_tasks)")
        job = load_job(spec["job"], f"{where}: data.{name}.job")
        config_cls = job.make_parser().dataclass_types[0]
        fields = field_types([config_cls])
        if "after" in spec and spec["after"] not in stages:
            raise UserError(f"{where}: data.{name}.after: '{spec['after']}' is not a stage of this recipe "
                            f"({', '.join(stages)})")
        for key in spec:
            if key in ("job", "after"):
                continue
            if key == "output_dir":
                raise UserError(f"{where}: data.{name}.output_dir: set by the pipeline (outputs/<run>/data/{name})")
            if key not in fields:
                raise UserError(f"{where}: data.{name}.{key}: unknown argument of job '{spec['job']}'"
                                f"{suggest(key, fields)}")
        values = checked_values({k: v for k, v in spec.items() if k not in ("job", "after")}, config_cls,
                                f"{where}: data.{name}.")
        try:  # what the job's config refuses; not its sources, which it reads from where the run finds them
            config = config_cls(**{key: value for key, value in values.items() if key != "sources"})
        except UserError as exc:
            raise UserError(f"{where}: data.{name}: {exc}") from None
        splits[name] = written_splits(job, config)
    return splits


def written_splits(job, config) -> list[str] | None:
    """The splits `job` writes with `config`: its `SPLITS` but the held-out one it is told to leave out (`test_size: 0`,
    `n_test: 0`, `test_split: null`), for which it writes no file; None where the job does not say."""
    if not hasattr(job, "SPLITS"):
        return None
    no_test = any(getattr(config, key, 1) in (0, None) for key in ("test_size", "n_test", "test_split"))
    return [split for split in job.SPLITS if not (split == "test" and no_test)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise UserError("give a command: list, check, or a job name (python -m data_prep.jobs list)")
    command, rest = argv[0], argv[1:]
    if command == "list":
        print(json.dumps({"jobs": list_jobs(), "tools": list(TOOLS)}))
        return 0
    if command == "check":
        section = json.load(sys.stdin)
        print(json.dumps(check_data_section(section["data"], section["where"], section["stages"])))
        return 0
    return load_job(command).main(rest) or 0


if __name__ == "__main__":
    run(main)
