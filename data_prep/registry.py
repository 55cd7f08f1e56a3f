"""LLaMA-Factory's `dataset_info.json`: a registry of datasets by name, each a file plus how to read it.

    posttrain data validate data/dataset_info.json:dpo_en_demo       # one dataset
    sources: [{dataset_info: data/dataset_info.json, name: dpo_en_demo}]   # in a data job / recipe

An entry's `file_name` (relative to the registry's folder) or `hf_hub_url` says where the rows are; `formatting`
(`alpaca`, the default, or `sharegpt`), `ranking` (preference pairs) and a `kto_tag` column (KTO labels) say which of
our formats they are in; `columns` maps LLaMA-Factory's column names to the file's, and `tags` (ShareGPT) the keys and
role names of its turns. Each row is renamed into the canonical keys of that format (`conversations` of
`{from, value}` turns with `human`/`gpt`/... roles, or Alpaca's `instruction`/`input`/`output`) and then converted
like any other file, so the error messages and checks are the same. Relative image paths start at the registry's
folder, as in LLaMA-Factory (its `media_dir` defaults to the dataset folder).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import UserError
from posttrain.typecheck import check_type

REGISTRY_NAME = "dataset_info.json"
# LLaMA-Factory's defaults for the ShareGPT tags, and the role names our ShareGPT reader knows them by.
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_CANONICAL_ROLE = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                   "function_tag": "function_call", "system_tag": "system"}
_COMMON_COLUMNS = ("system", "tools", "images")


@dataclass
class RegistryEntry:
    """One dataset of a registry, resolved: where its rows are, their format, and how to rename a row's keys."""

    name: str
    path: str
    format: str
    remap: Callable[[dict], dict]
    base_dir: Path
    split: str = "train"
    subset: str | None = None


def split_spec(text: str) -> tuple[str, str | None] | None:
    """`path/dataset_info.json:name` -> (registry path, name); a bare registry path -> (path, None); else None."""
    head, _, name = text.rpartition(":")
    if head and Path(head).name.endswith(".json") and Path(head).is_file() and name:
        return head, name
    if Path(text).name == REGISTRY_NAME and Path(text).is_file():
        return text, None
    return None


def read_registry(registry: str) -> dict:
    path = Path(registry)
    if not path.is_file():
        raise UserError(f"dataset registry not found: {registry} (expected LLaMA-Factory's dataset_info.json)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{registry}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise UserError(f"{registry}: expected a JSON object of datasets, each {{\"file_name\": ..., ...}}")
    return entries


def load_entry(registry: str, name: str) -> RegistryEntry:
    """The dataset `name` of `registry`, with its format and row renaming; errors name the registry and the key."""
    entries = read_registry(registry)
    if name not in entries:
        raise UserError(f"{registry}: no dataset '{name}'; it has: {', '.join(entries) or 'none'}")
    entry, where = entries[name], f"{registry}: dataset '{name}'"
    check_entry(entry, where)
    folder = Path(registry).parent
    if entry.get("file_name"):
        path = str(folder / entry["file_name"])
    elif entry.get("hf_hub_url"):
        path = entry["hf_hub_url"]
    else:
        raise UserError(f"{where}: no `file_name` (or `hf_hub_url`); expected where its rows are")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise UserError(f"{where}: `formatting` is '{formatting}'; expected alpaca or sharegpt")
    columns = entry.get("columns") or {}
    tags = {**SHAREGPT_TAGS, **(entry.get("tags") or {})}
    ranking, kto = bool(entry.get("ranking")), "kto_tag" in columns
    if ranking and kto:
        raise UserError(f"{where}: both `ranking` and a `kto_tag` column; expected one kind of preference data")
    if formatting == "sharegpt":
        fmt = "sharegpt_preference" if ranking else "kto_conversation" if kto else "sharegpt"
        remap = _sharegpt_remap(columns, tags, ranking)
    else:
        fmt = "preference" if ranking else "unpaired" if kto else "alpaca"
        remap = _alpaca_remap(columns, ranking, kto)
    return RegistryEntry(name, path, fmt, remap, folder, entry.get("split", "train"), entry.get("subset"))


# The entry keys we read, as LLaMA-Factory types them; `columns` and `tags` map names to names.
ENTRY_TYPES = {"file_name": str | None, "hf_hub_url": str | None, "formatting": str | None, "ranking": bool | None,
               "columns": dict | None, "tags": dict | None, "split": str | None, "subset": str | None}


def check_entry(entry: dict, where: str) -> None:
    """Raise a UserError naming the entry and the key whose value is of the wrong type."""
    for key, annotation in ENTRY_TYPES.items():
        check_type(entry.get(key), annotation, f"{where}: `{key}`")
    for key in ("columns", "tags"):
        for name, value in (entry.get(key) or {}).items():
            if not isinstance(value, str):
                raise UserError(f"{where}: `{key}.{name}` is {value!r}; expected a string (a column or tag name)")


def _copy(row: dict, out: dict, columns: dict, keys) -> dict:
    for key in keys:
        column = columns.get(key, key)
        if column in row:
            out[key] = row[column]
    return out


def _sharegpt_remap(columns: dict, tags: dict, ranking: bool) -> Callable[[dict], dict]:
    roles = {tags[tag]: canonical for tag, canonical in _CANONICAL_ROLE.items()}

    def turn(value):
        if not isinstance(value, dict):
            return value  # the converter names what is wrong with it
        out = {"from": roles.get(value.get(tags["role_tag"]), value.get(tags["role_tag"])),
               "value": value.get(tags["content_tag"])}
        if value.get("tool_calls"):  # OpenAI-tagged turns carry their calls beside the content
            out["tool_calls"] = value["tool_calls"]
        return out

    def remap(row: dict) -> dict:
        out = _copy(row, {}, columns, _COMMON_COLUMNS)
        turns = row.get(columns.get("messages", "conversations"))
        out["conversations"] = [turn(t) for t in turns] if isinstance(turns, list) else turns
        for key in ("chosen", "rejected") if ranking else ():
            value = row.get(columns.get(key, key))
            out[key] = [turn(t) for t in value] if isinstance(value, list) else turn(value)
        if "kto_tag" in columns:
            out["label"] = row.get(columns["kto_tag"])
        return out

    return remap


def _alpaca_remap(columns: dict, ranking: bool, kto: bool) -> Callable[[dict], dict]:
    names = {"instruction": columns.get("prompt", "instruction"), "input": columns.get("query", "input"),
             "output": columns.get("response", "output"), "history": columns.get("history", "history")}

    def remap(row: dict) -> dict:
        out = _copy(row, {}, columns, _COMMON_COLUMNS)
        out.update({key: row[column] for key, column in names.items() if column in row})
        if ranking:
            _copy(row, out, columns, ("chosen", "rejected"))
            out.pop("output", None)
        if kto:  # unpaired rows; the converter builds the prompt from system, history, instruction and input
            out = {**out, "completion": out.get("output"), "label": row.get(columns["kto_tag"])}
        return out

    return remap
