"""The pipeline every build job runs: import and validate sources, clean, split, mix, write with a data card.

    sources --convert/validate--> records --exact dedup--> --near dedup--> --decontaminate--> --length filter-->
    --held-out split--> --mix by weight (each split)--> OUT/{train,test}.parquet + README.md + card.json

The held-out split is drawn before mixing, by prompt, so that neither a source repeated by a weight > 1 nor several
rows of one prompt ever put a copy of a test prompt into the training split.
"""

import dataclasses
import hashlib
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from posttrain.errors import UserError

from . import card as card_lib
from . import clean
from .config import PreferenceSetConfig, PromptSetConfig
from .formats import FORMATS, Options, convert_rows
from .images import embed_image
from .readers import read_rows
from .registry import load_entry

KIND_COLUMNS = {"sft": ["messages"], "preference": ["prompt", "chosen", "rejected"],
                "unpaired": ["prompt", "completion", "label"], "rl": ["prompt", "answer", "domain"]}
OPTIONAL_COLUMNS = ["tools", "images", "thinking"]
KIND_HINTS = {"unpaired": ": its rows carry a KTO `label` marking replies desirable or not, so training on all of "
                          "them as SFT would teach the undesirable ones too; build_preference_set reads it",
              "rl": ": questions with reference answers, for UPO; build_prompt_set reads it",
              "preference": ": chosen and rejected replies, for DPO; build_preference_set reads it (for SFT on a "
                            "`messages` column beside them, as UltraFeedback-binarized has, set `format: messages`)"}
CONVERSATION_COLUMNS = ("messages", "prompt", "chosen", "rejected", "completion")


def progress(rows, description: str):
    """A rich progress display on a terminal; silent in logs and tests. Rich draws it on its console (stdout): a
    recipe's data job has a pipe for its stderr (`posttrain.datajobs.StderrTail`), which says nothing of the screen."""
    from rich import get_console
    from rich.progress import track

    return track(rows, description=description, transient=True, disable=not get_console().is_terminal)


def import_source(source, cfg, kinds: tuple[str, ...], job: str, rejects: list[dict]) -> tuple[list[dict], dict]:
    """Convert every row of one source; bad rows fail the job or, with `on_error: skip`, go to `rejects`."""
    local = Path(source.path).exists()
    margin = cfg.min_score_margin if isinstance(cfg, PreferenceSetConfig) else 0.0
    opts = Options(base_dir=Path(source.path).parent if local else Path.cwd(), check_images=cfg.check_images,
                   min_score_margin=margin, domain=source.name, embedded_images=True)
    if isinstance(cfg, PromptSetConfig):
        opts.system, opts.thinking = cfg.system, cfg.thinking
    fmt, split, subset, remap = source.format, source.split, source.subset, None
    if source.dataset_info:
        entry = load_entry(source.dataset_info, source.name)
        opts.base_dir, remap = entry.base_dir, entry.remap
        fmt, split, subset = (entry.format if fmt == "auto" else fmt), entry.split, entry.subset or subset
    fmt, rows = convert_rows(source.path, fmt, opts, cfg.max_row_bytes, split, subset, remap)
    kind = FORMATS[fmt][0]
    if kind not in kinds:
        hint = KIND_HINTS.get(kind, "")
        raise UserError(f"source '{source.name}' ({source.path}) is {kind} data (format '{fmt}'); {job} takes "
                        f"{' or '.join(kinds)} data{hint}")
    stats = {"name": source.name, "path": source.path, "format": fmt, "kind": kind, "license": source.license,
             "weight": source.weight, "notes": source.notes, "rows_read": 0, "rows_invalid": 0, "rows_skipped": 0}
    records, notes = [], Counter()
    for item in progress(rows, f"Reading {source.name}"):
        stats["rows_read"] += 1
        if item.error:
            if cfg.on_error == "fail":
                raise UserError(f"{item.where}: {item.error}\n(set `on_error: skip` to write bad rows to "
                                "rejects.jsonl and go on, or run `posttrain data validate` to list them all)")
            stats["rows_invalid"] += 1
            rejects.append(_reject(item.where, source.name, "invalid", item.error, item.raw, item.text))
        elif item.skip:
            stats["rows_skipped"] += 1
            rejects.append(_reject(item.where, source.name, "margin", item.skip, item.raw))
        else:
            if item.note:
                notes[item.note] += 1
            records.append({**item.record, "_origin": item.where, "_source": source.name})
    for note, count in notes.items():
        print(f"warning: source '{source.name}': {count} row(s) with {note}", file=sys.stderr)
    return records, stats


def _reject(where: str, source: str, step: str, reason: str, row, text: str | None = None) -> dict:
    reject = {"where": where, "source": source, "filter": step, "reason": reason, "row": _without_bytes(row)}
    return {**reject, "raw_text": text} if text is not None else reject


def _without_bytes(value):
    """`value` with each bytes value (an embedded image) as its sha256 and size: a rejects.jsonl line stays short,
    readable JSON, and the sha256 is the one dedup keys the image by."""
    if isinstance(value, (bytes, bytearray)):
        return {"sha256": hashlib.sha256(value).hexdigest(), "bytes": len(value)}
    if isinstance(value, dict):
        return {k: _without_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_bytes(v) for v in value]
    return value


def unpair(records: list[dict]) -> list[dict]:
    """Preference pairs as KTO rows: chosen -> `label: True`, rejected -> `label: False` (TRL's unpairing); both keep
    the pair's images, tools and thinking mode."""
    out = []
    for r in records:
        if "chosen" not in r:
            out.append(r)
            continue
        shared = {k: r[k] for k in ("prompt", *OPTIONAL_COLUMNS, "_source") if k in r}
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({**shared, "completion": r[key], "label": label, "_origin": f"{r['_origin']} ({key})"})
    return out


def to_dataset(records: list[dict], kind: str):
    """A `datasets.Dataset` with the kind's columns, optional columns only when some row has them.

    `images` are absolute path strings, unless some row holds image bytes: then every row's images are embedded (the
    files read), so the set is self-contained and its parquet sha256 covers them. Embedded images stay undecoded
    (`{"bytes", "path"}`) for the filters; `writable` types them as `datasets.Image` for the stages."""
    from datasets import Dataset, Features, Image, Json, List, Value

    embedded = any(isinstance(image, dict) for r in records for image in r.get("images") or [])
    if embedded:
        for r in records:
            r["images"] = [embed_image(image) for image in r["images"]] if r.get("images") else None
    images = List(Image(decode=False)) if embedded else List(Value("string"))
    columns = KIND_COLUMNS[kind] + [c for c in OPTIONAL_COLUMNS if any(r.get(c) is not None for r in records)]
    if "thinking" in columns:  # once any row sets a mode, rows without a think block train the non-thinking one
        for r in records:
            r["thinking"] = bool(r.get("thinking"))
    features = {}
    for col in columns:
        if col in CONVERSATION_COLUMNS:
            plain = all(set(m) <= {"role", "content"} and isinstance(m["content"], str) for r in records for m in r[col])
            # Json keeps tool calls and vision parts exactly, without the None-padding a struct would add.
            features[col] = List({"role": Value("string"), "content": Value("string")}) if plain else List(Json())
        else:
            features[col] = {"tools": Json(), "images": images, "thinking": Value("bool"),
                             "label": Value("bool")}.get(col, Value("string"))
    features = Features({**features, "_origin": Value("string"), "_source": Value("string")})
    rows = [{c: r.get(c) for c in features} for r in records]
    if any(isinstance(f, Json) or (isinstance(f, List) and isinstance(f.feature, Json)) for f in features.values()):
        return Dataset.from_list(rows, features=features), columns
    # Plain columns: pyarrow converts the rows ~7x faster than `from_list`'s per-row feature encoding.
    return Dataset(pa.Table.from_pylist(rows, schema=features.arrow_schema)), columns


def writable(dataset):
    """`dataset` without the pipeline's `_` columns, its embedded images (if any) typed to decode as PIL images."""
    from datasets import Image, List

    dataset = dataset.remove_columns([c for c in dataset.column_names if c.startswith("_")])
    feature = dataset.features.get("images")
    if isinstance(feature, List) and isinstance(feature.feature, Image):
        dataset = dataset.cast_column("images", List(Image()))
    return dataset


def on_disk(dataset, work_dir: Path):
    """The dataset memory-mapped from `work_dir`: `map(num_proc=...)` workers then open the file instead of
    receiving a pickled copy of the whole table, and every intermediate column stays off the heap."""
    from datasets import load_from_disk

    dataset.save_to_disk(str(work_dir))
    return load_from_disk(str(work_dir))


def eval_texts(paths: list[str], max_row_bytes: int) -> dict[str, list[str]]:
    """All the strings of every row of each evaluation set, whatever its format (GSM8K, HumanEval, chat...). A row
    that cannot be read is an error whatever `on_error` says: skipped, its text would reach training unchecked."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    def rows(path):
        for r in read_rows(path, max_row_bytes):
            if r.error:
                raise UserError(f"{r.where}: {r.error} (evaluation set in `decontaminate`: fix the row, as it cannot "
                                "be checked against the training rows)")
            yield r.row

    return {path: ["\n".join(strings(row)) for row in rows(path)] for path in paths}


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # OSError, ValueError, HF hub errors: all mean "could not get this tokenizer"
        raise UserError(f"could not load tokenizer '{name_or_path}' (a local folder or a cached Hub id): {exc}") \
            from None


def clean_dataset(dataset, cfg, tokenizer, counts: list[dict], rejects: list[dict]):
    """Run the enabled filters in order, recording before/after counts and every removed row."""
    # Process start-up costs more than it saves below ~20k rows.
    num_proc = cfg.num_proc or (os.cpu_count() if len(dataset) >= 20_000 else None)
    dataset = clean.add_lengths(clean.add_text(dataset, num_proc), tokenizer, num_proc)
    steps = []
    if cfg.dedup:
        steps.append(("exact_dup", lambda d: clean.exact_dedup(d, num_proc)))
    if cfg.near_dup_threshold is not None:
        steps.append(("near_dup", lambda d: clean.near_dedup(d, cfg.near_dup_threshold, cfg.near_dup_ngram,
                                                             cfg.num_perm, num_proc, clean.near_dup_columns(d))))
    if cfg.decontaminate:
        table = clean.eval_ngrams(eval_texts(cfg.decontaminate, cfg.max_row_bytes), cfg.decontam_ngram)
        steps.append(("contamination", lambda d: clean.decontaminate(d, table, cfg.decontam_ngram, num_proc)))
    if cfg.min_tokens is not None or cfg.max_tokens is not None:
        steps.append(("length", lambda d: clean.length_filter(d, cfg.min_tokens, cfg.max_tokens)))
    for name, step in steps:
        kept, removed = step(dataset)
        counts.append({"step": name, "before": len(dataset), "after": len(kept)})
        for row in removed:
            rejects.append(_reject(row["_origin"], row["_source"], name, row["_reason"], _public(row)))
        dataset = kept
    return dataset


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def prompt_groups(keys: list[list[str]]) -> list[list[int]]:
    """The rows (indices) linked by a shared key, directly or through other rows, in order of first appearance."""
    parent, first = list(range(len(keys))), {}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    for i, row_keys in enumerate(keys):
        for key in row_keys:
            parent[root(i)] = root(first.setdefault(key, i))
    groups = {}
    for i in range(len(keys)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def held_out_split(dataset, test_size: float, seed: int) -> dict:
    """`train` and `test`, each prompt group (`_group`: the pairs of one prompt, both halves of an unpaired pair, a
    conversation and the rows holding its first turns) on one side only: a held-out prompt is never trained on.
    Groups are drawn in a seeded order until `test_size` rows (a fraction, or a row count) are held out; the last
    group drawn may take it a little over."""
    wanted = int(test_size) if test_size >= 1 else math.ceil(test_size * len(dataset))
    members, test = prompt_groups(clean.column(dataset, "_group")), []
    for g in np.random.default_rng(seed).permutation(len(members)):
        if len(test) >= wanted:
            break
        test += members[g]
    if not 0 < len(test) < len(dataset):
        raise UserError(f"cannot hold out test_size={test_size:g} of {len(dataset)} rows with {len(members)} distinct "
                        "prompt(s); expected at least one prompt's rows on each side of the split")
    chosen = np.zeros(len(dataset), dtype=bool)
    chosen[test] = True
    return {"train": dataset.select(np.flatnonzero(~chosen)), "test": dataset.select(np.flatnonzero(chosen))}


# The splits `build_set` writes (test with `test_size` only): a recipe's split names are checked against them.
SPLITS = ("train", "test")


def split_and_mix(dataset, weights: dict[str, float], test_size: float, seed: int, rejects: list[dict]) -> dict:
    """Held-out split first, then each split mixed by source weight (the test split is never upsampled). The rows a
    weight below 1 does not draw go to `rejects` (filter `mix`)."""
    splits = held_out_split(dataset, test_size, seed) if test_size else {"train": dataset}
    rng = np.random.default_rng(seed)
    mixed = {}
    for name, data in splits.items():
        sources = np.asarray(clean.column(data, "_source")) if len(data) else np.asarray([], dtype=str)
        picked, left_out = [], []
        for source, weight in weights.items():
            weight = min(weight, 1.0) if name == "test" else weight
            idx = np.flatnonzero(sources == source)
            whole, fraction = divmod(weight, 1.0)
            # the share rounded half up: Python's `round` (half to even) kept 2 of 5 rows at 0.5, 2 of 3 and none of 1
            extra = rng.choice(idx, size=int(len(idx) * fraction + 0.5), replace=False)
            picked.append(np.concatenate([np.tile(idx, int(whole)), extra]).astype(int))
            if not whole:
                left_out.append((weight, np.setdiff1d(idx, extra)))
        mixed[name] = data.select(rng.permutation(np.concatenate(picked)) if picked else [])
        if name == "train" and not len(mixed[name]):
            rows = Counter(sources.tolist())
            given = ", ".join(f"'{s}' {w:g} x {rows[s]} rows" for s, w in weights.items())
            raise UserError(f"the training split is empty after mixing by weight ({given}); expected at least one "
                            "row: raise the weights (a weight below 1 keeps that share of a source's rows)")
        for weight, idx in left_out:
            for row in data.select(idx):
                rejects.append(_reject(row["_origin"], row["_source"], "mix",
                                       f"weight {weight:g}: not drawn into {name} (seed {seed})", _public(row)))
    return mixed


def output_kind(sources: list[dict], cfg) -> str:
    """The kind of the output: the sources' kind; `unpaired` when asked for or when every source is unpaired."""
    kinds = {s["kind"] for s in sources}
    asked = isinstance(cfg, PreferenceSetConfig) and cfg.unpaired
    if kinds <= {"preference", "unpaired"} and (asked or kinds == {"unpaired"}):
        return "unpaired"
    if len(kinds) > 1:
        raise UserError("the sources mix paired (prompt/chosen/rejected) and unpaired (prompt/completion/label) data; "
                        "set `unpaired: true` to turn each pair into a True and a False row, or build them apart")
    return kinds.pop()


def build_set(cfg, job: str, kinds: tuple[str, ...], command: str, train_split: str = "train") -> dict:
    """Run the whole pipeline for `cfg` and write `cfg.output_dir`, the training rows as `train_split`; returns the
    data card facts."""
    out_dir = card_lib.check_output_dir(cfg.output_dir, cfg.overwrite, input_paths(cfg))
    names = Counter(s.name for s in cfg.sources)
    if max(names.values()) > 1:
        raise UserError(f"two sources are named '{names.most_common(1)[0][0]}'; give each a distinct `name`")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    records, sources, rejects = [], [], []
    for source in cfg.sources:
        source_records, stats = import_source(source, cfg, kinds, job, rejects)
        records += source_records
        sources.append(stats)
    kind = output_kind(sources, cfg)
    counts = [{"step": "validation", "before": sum(s["rows_read"] for s in sources), "after": len(records)}]
    if kind == "unpaired":
        records = unpair(records)
        counts.append({"step": "unpairing", "before": counts[-1]["after"], "after": len(records)})
    if not records:
        raise UserError(f"no valid rows in {', '.join(s.path for s in cfg.sources)}; run `posttrain data validate`")
    dataset, columns = to_dataset(records, kind)
    del records
    with tempfile.TemporaryDirectory(prefix="posttrain-data-") as work_dir:
        dataset = clean_dataset(on_disk(dataset, Path(work_dir)), cfg, tokenizer, counts, rejects)
        splits = split_and_mix(dataset, {s.name: s.weight for s in cfg.sources}, cfg.test_size, cfg.seed, rejects)
        splits = {train_split if name == "train" else name: data for name, data in splits.items()}
        counts.append({"step": "mix", "before": len(dataset), "after": sum(len(d) for d in splits.values())})
        card = _card_facts(cfg, job, kind, columns, command, sources, counts, rejects, splits, tokenizer)
        lengths = [n for d in splits.values() for n in clean.column(d, "_length")]
        public = {name: writable(d) for name, d in splits.items()}
        card_lib.write_output(out_dir, public, rejects, card, lengths, card["length_unit"], cfg.overwrite,
                              input_paths(cfg))
    return card


def input_paths(cfg) -> list[str]:
    """Every local path the job reads: the output folder must not be or hold one of them."""
    paths = [p for s in cfg.sources for p in (s.path, s.dataset_info)] + list(cfg.decontaminate)
    return [p for p in paths + [cfg.tokenizer] if p]


def _card_facts(cfg, job, kind, columns, command, sources, counts, rejects, splits, tokenizer) -> dict:
    removed = Counter((r["source"], r["filter"]) for r in rejects)
    kept = Counter(name for d in splits.values() for name in clean.column(d, "_source"))  # once, not per source
    for stats in sources:
        stats["rows_kept"] = kept[stats["name"]]
        stats["removed"] = {step: n for (name, step), n in removed.items() if name == stats["name"]}
    contaminated = sum(1 for r in rejects if r["filter"] == "contamination")
    options = dataclasses.asdict(cfg)
    return {
        "name": Path(cfg.output_dir).name, "job": job, "kind": kind, "columns": columns, "created": card_lib.now(),
        "command": command, "sources": sources, "counts": counts, "rejects": len(rejects),
        "filters": {k: options[k] for k in ("dedup", "near_dup_threshold", "near_dup_ngram", "min_tokens",
                                            "max_tokens", "decontam_ngram")},
        "decontamination": {"eval_sets": cfg.decontaminate, "ngram": cfg.decontam_ngram, "removed": contaminated}
        if cfg.decontaminate else None,
        "mix": {"seed": cfg.seed, "test_size": cfg.test_size, "weights": {s.name: s.weight for s in cfg.sources}},
        "length_unit": f"tokens ({cfg.tokenizer})" if tokenizer else "words",
        "length_stats": card_lib.length_stats([n for d in splits.values() for n in clean.column(d, "_length")]),
        "options_yaml": yaml.safe_dump(options, sort_keys=False, allow_unicode=True),
    }
