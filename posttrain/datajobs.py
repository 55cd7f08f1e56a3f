"""Find and run `data_prep` jobs by name, for `posttrain data` and for the `data:` section of a recipe.

A job is a module `data_prep/<verb>.py` with `make_parser()` (a parser over config dataclasses) and
`main(argv) -> int`. The pipeline runs a recipe's jobs in-process with a YAML config, so the recipe, the CLI and
`python -m data_prep.<job>` all go through the same code.
"""

import dataclasses
import importlib
import pkgutil
import tempfile
from pathlib import Path

import yaml

from .errors import UserError

# Reachable as `posttrain data <name>` but not builders a recipe's `data:` section runs: a check, and one-off
# extractors of the real-data snapshots committed under data_prep/sources/.
NOT_JOBS = {"validate", "extract_hhh_alignment", "extract_chitchat"}


def list_jobs() -> list[str]:
    import data_prep

    names = []
    for info in pkgutil.iter_modules(data_prep.__path__):
        if info.ispkg or info.name.startswith("_") or info.name in NOT_JOBS:
            continue
        module = importlib.import_module(f"data_prep.{info.name}")
        if hasattr(module, "make_parser") and hasattr(module, "main"):
            names.append(info.name)
    return sorted(names)


def load_job(job: str, where: str = "data job"):
    if job not in list_jobs() and job not in NOT_JOBS:
        raise UserError(f"{where}: '{job}' is not a data_prep job; the jobs are: {', '.join(list_jobs())}")
    return importlib.import_module(f"data_prep.{job}")


def job_config_fields(job: str, where: str = "data job") -> dict:
    """name -> type annotation of every config field of `job` (for recipe validation)."""
    import typing

    parser = load_job(job, where).make_parser()
    fields = {}
    for cls in parser.dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields[f.name] = hints.get(f.name, typing.Any)
    return fields


def run_job(job: str, args: dict, out: str | Path) -> None:
    """Run `job` with `args` (a mapping of its config fields), writing to `out`."""
    module = load_job(job)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump({**args, "output_dir": str(out)}, handle)
    try:
        code = module.main(["--config", handle.name])
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if code:
        raise UserError(f"data job '{job}' failed with exit code {code}")
