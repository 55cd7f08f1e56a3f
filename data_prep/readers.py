"""Reading raw rows from files, `save_to_disk` folders and Hub ids, each row tagged with where it came from.

JSON Lines and CSV are read line by line here rather than with `datasets.load_dataset`: its loaders stop at the first
bad line of a file and forget line numbers, and an error that says `prefs.jsonl:17` is the whole point of validation.
Parquet, `save_to_disk` folders and Hub datasets are typed already, so they go through pyarrow / `datasets`.
"""

import codecs
import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import UserError

_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns undecodable bytes into
_CSV_DEFAULT_LIMIT = 131_072
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RawRow:
    """One input row: `where` is `FILE:LINE` (or `FILE:ROW`), `row` the parsed mapping or `None` with `error` set
    and, for a line that did not parse, its `text` (so the rejects file keeps what was dropped)."""

    where: str
    row: dict | None
    error: str | None = None
    text: str | None = None


def _excerpt(raw: bytes, limit: int = 10_000) -> str:
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit:,} more characters]"


def is_offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def source_kind(path: str) -> str:
    """`jsonl`, `json`, `parquet`, `csv`, `disk` (a `save_to_disk` folder) or `hub`; a missing local path is an error."""
    local = Path(path)
    if local.is_dir():
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            return "disk"
        if (local / "dataset_info.json").is_file():  # LLaMA-Factory's data/ folder has one too
            raise UserError(f"{path}: a folder with a dataset_info.json but no state.json or dataset_dict.json, so "
                            "not a `datasets` save_to_disk folder; for LLaMA-Factory's dataset registry, name one of "
                            f"its datasets: {local / 'dataset_info.json'}:NAME")
        files = sorted(str(f) for f in [*local.glob("*"), *local.glob("data/*")] if f.suffix.lower() in FILE_TYPES)
        named = f"; name its data files instead: {' '.join(files[:6])}{' …' if len(files) > 6 else ''}" if files else ""
        raise UserError(f"{path}: a folder, but not a `datasets` save_to_disk folder (no state.json or "
                        f"dataset_dict.json){named}")
    if local.suffix.lower() in FILE_TYPES:
        if not local.is_file():
            raise UserError(f"data file not found: {path}")
        return FILE_TYPES[local.suffix.lower()]
    if path.count("/") == 1 and not path.startswith((".", "/", "~")) and not local.exists():
        return "hub"
    if local.is_file():
        raise UserError(f"{path}: unsupported file type '{local.suffix}'; expected one of {', '.join(FILE_TYPES)}")
    raise UserError(f"{path}: not found (expected a data file, a save_to_disk folder, or a Hub id 'org/name')")


def read_rows(path: str, max_row_bytes: int, split: str | None = None, subset: str | None = None) -> Iterator[RawRow]:
    """Every row of `path`, in order; rows that cannot be parsed come back with `error` set instead of raising.

    `split` picks one split of a `save_to_disk` DatasetDict folder or a Hub dataset; `None` reads every split (an
    evaluation set's `test` split is the one decontamination must see)."""
    kind = source_kind(path)
    if kind == "jsonl":
        return _read_jsonl(path, max_row_bytes)
    if kind == "json":
        return _read_json(path, max_row_bytes)
    if kind == "csv":
        return _read_csv(path, max_row_bytes)
    if kind == "parquet":
        return _read_parquet(path)
    return _read_dataset(path, kind, split, subset)


def _decode_line(raw: bytes, max_row_bytes: int) -> tuple[dict | None, str | None]:
    if len(raw) > max_row_bytes:
        return None, f"row is {len(raw):,} bytes, more than max_row_bytes={max_row_bytes:,}; expected a smaller row"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                      "expected UTF-8 text: re-save the file as UTF-8")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno}); expected one complete JSON object per line"
    except RecursionError:  # json recurses once per level: one row nested thousands deep would end the whole job
        return None, "nested too deeply to parse; expected one JSON object per line"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object; expected one JSON object per line"
    if has_lone_surrogate(text, row):
        return None, LONE_SURROGATE
    return row, None


LONE_SURROGATE = "holds a lone UTF-16 surrogate escape (e.g. \\ud83d without its pair); expected valid Unicode text"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def has_lone_surrogate(text: str, row) -> bool:
    """Whether the JSON `text` parsed into `row` holds a `\\ud83d`-style escape without its pair: json accepts it,
    but no UTF-8 file (parquet) can store it. Only rows whose text has a surrogate escape at all are re-encoded."""
    if not _SURROGATE_ESCAPE.search(text):
        return False
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_jsonl(path: str, max_row_bytes: int) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                row, error = _decode_line(raw.rstrip(), max_row_bytes)  # leading blanks kept: columns count them
                yield RawRow(f"{path}:{line_no}", row, error, _excerpt(raw.strip()) if error else None)


def _read_json(path: str, max_row_bytes: int) -> Iterator[RawRow]:
    """A JSON array of objects (positions reported as line numbers), or JSON Lines saved under a .json name.

    An array that is broken in itself (an element that does not parse, no closing `]`, content after it) is an error
    whatever `on_error` says: from there on no element can be told apart, so rows would be lost without a trace."""
    raw = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    if not raw.lstrip().startswith(b"["):
        yield from _read_jsonl(path, max_row_bytes)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8") \
            from None
    decoder = json.JSONDecoder()
    pos = _skip(text, text.index("[") + 1)
    line, counted = 1, 0  # lines counted up to `counted`: counting from the start for every element is quadratic
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); expected a JSON "
                            "array of objects (the rest of the array cannot be read)") from None
        except RecursionError:  # as in `_decode_line`
            raise UserError(f"{path}:{line}: an element nested too deeply to parse; expected a JSON array of "
                            "objects (the rest of the array cannot be read)") from None
        yield _array_element(f"{path}:{line}", text[pos:end], row, max_row_bytes)
        pos = _skip(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            break  # a missing comma: reported below
    _check_array_end(path, text, pos)


def _array_element(where: str, text: str, row, max_row_bytes: int) -> RawRow:
    if not isinstance(row, dict):
        return RawRow(where, None, f"a JSON {type(row).__name__}, not an object; expected objects")
    if len(text) > max_row_bytes:
        return RawRow(where, None, f"row is {len(text):,} characters, more than max_row_bytes")
    if has_lone_surrogate(text, row):
        return RawRow(where, None, LONE_SURROGATE)
    return RawRow(where, row)


def _check_array_end(path: str, text: str, pos: int) -> None:
    """`pos` should be the closing `]` of the array, with nothing but whitespace after it."""
    line = text.count("\n", 0, pos) + 1
    if pos >= len(text):
        raise UserError(f"{path}:{line}: the JSON array is not closed; expected a final ']' (a truncated file?)")
    if text[pos] != "]":
        raise UserError(f"{path}:{line}: {text[pos:pos + 20]!r} after an array element; expected ',' or ']'")
    rest = _skip(text, pos + 1)
    if rest < len(text):
        line = text.count("\n", 0, rest) + 1
        raise UserError(f"{path}:{line}: more content after the array's closing ']'; expected one JSON array "
                        "(concatenated arrays: merge them into one, or write JSON Lines)")


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _read_csv(path: str, max_row_bytes: int) -> Iterator[RawRow]:
    """CSV rows; cells holding JSON lists or objects (messages, conversations) are decoded."""
    for where, record in _csv_records(path, max_row_bytes):
        cells = "".join(v for v in record.values() if isinstance(v, str))
        if None in record:
            yield RawRow(where, None, "more cells than header columns; expected one cell per column")
        elif _BAD_BYTE.search(cells):
            yield RawRow(where, None, "not valid UTF-8; expected UTF-8 text: re-save the file as UTF-8")
        elif len(cells) > max_row_bytes:
            yield RawRow(where, None, f"row is more than max_row_bytes={max_row_bytes:,}")
        else:
            row = {k: _json_cell(v, k) for k, v in record.items()}
            yield RawRow(where, None, LONE_SURROGATE) if has_lone_surrogate(cells, row) else RawRow(where, row)


def _csv_records(path: str, max_row_bytes: int) -> Iterator[tuple[str, dict]]:
    """(`FILE:LINE`, cells by column) for each record; a file the csv module cannot read is a UserError there."""
    # csv refuses cells over 131,072 characters by default, but rows up to max_row_bytes are allowed (a process-wide
    # setting, so it is set on every read). utf-8-sig: a BOM must not become part of the first column's name.
    # surrogateescape: a stray non-UTF-8 byte spoils its own row, not the whole file.
    csv.field_size_limit(min(max(max_row_bytes, _CSV_DEFAULT_LIMIT), sys.maxsize))
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        line = 1
        try:
            for record in reader:
                yield f"{path}:{line + 1}", record
                line = reader.line_num
        except csv.Error as exc:
            raise UserError(f"{path}:{line + 1}: not readable as CSV ({exc}); expected comma-separated cells, "
                            f"each at most max_row_bytes={max_row_bytes:,} characters") from None


# Columns whose cell may be plain text as well as a conversation: a reply that is JSON text (`[2, 3, 5]`,
# `{"name": "Bob"}`) stays text there; only a list of messages (or one ShareGPT `{from, value}` turn) is decoded.
_TEXT_COLUMNS = {"prompt", "completion", "chosen", "rejected", "instruction", "input", "output", "system", "question",
                 "answer", "reasoning", "text", "problem", "solution", "ground_truth", "reference"}


def _json_cell(value: str | None, column: str | None = None):
    if column == "thinking" and value and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"  # the thinking mode, which CSV (and pandas' to_csv) writes as text
    if value and value.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # as in `_decode_line`: kept as the text it is
            return value
        if column in _TEXT_COLUMNS and not _is_conversation(decoded):
            return value
        return decoded
    return value


def _is_conversation(value) -> bool:
    """A list of message objects, or one message object (`{"role"...}` / `{"from"...}`)."""
    if isinstance(value, dict):
        return "role" in value or "from" in value
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for the same "not a parquet file"
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    row_no = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in _batch_rows(batch):
            row_no += 1
            yield RawRow(f"{path}:{row_no}", row)


def _read_dataset(path: str, kind: str, split: str | None, subset: str | None) -> Iterator[RawRow]:
    """Arrow rows, as from a parquet file: iterating the `Dataset` itself would decode `Image` columns to PIL objects,
    which no converter reads (they take a path or `{"bytes", "path"}`). Without a `split`, every split's rows, each
    placed as `PATH[SPLIT]:ROW`."""
    loaded = load_disk(path, split) if kind == "disk" else load_hub(path, split, subset)
    for name, dataset in loaded.items() if isinstance(loaded, dict) else [(None, loaded)]:  # a DatasetDict
        where, index = (path if name is None else f"{path}[{name}]"), 0
        for batch in dataset.with_format("arrow").iter(batch_size=1024):
            for row in _batch_rows(batch):
                index += 1
                yield RawRow(f"{where}:{index}", row)


def _batch_rows(batch) -> list[dict]:
    """A record batch or table as dicts, values of Arrow's JSON extension type (`datasets.Json`, which the build jobs
    write for rows with tools, tool calls or image parts) decoded: `to_pylist` leaves them as JSON text."""
    rows = batch.to_pylist()
    for field in batch.schema:
        if _has_json(field.type):
            for row in rows:
                row[field.name] = _decode_json(row[field.name], field.type)
    return rows


def _has_json(arrow_type) -> bool:
    import pyarrow as pa

    if isinstance(arrow_type, pa.JsonType):
        return True
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _has_json(arrow_type.value_type)
    return pa.types.is_struct(arrow_type) and any(_has_json(f.type) for f in arrow_type)


def _decode_json(value, arrow_type):
    import pyarrow as pa

    if value is None or not _has_json(arrow_type):
        return value
    if isinstance(arrow_type, pa.JsonType):
        return json.loads(value)
    if pa.types.is_struct(arrow_type):
        return {f.name: _decode_json(value.get(f.name), f.type) for f in arrow_type}
    return [_decode_json(v, arrow_type.value_type) for v in value]


def load_disk(path: str, split: str | None):
    """The `split` of a `save_to_disk` folder; a DatasetDict whole when `split` is None."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(path)
    except Exception as exc:  # a missing .arrow file, a broken state.json...: datasets' own types, or OSError
        raise UserError(f"{path}: not a readable save_to_disk folder ({type(exc).__name__}: {exc})") from None
    if isinstance(dataset, DatasetDict) and split is not None:
        if split not in dataset:
            raise UserError(f"{path}: no split '{split}' (has: {', '.join(dataset)}); set the source's `split`")
        dataset = dataset[split]
    return dataset


def load_hub(repo_id: str, split: str | None, subset: str | None):
    """A Hub dataset (every split, a DatasetDict, when `split` is None); offline, an immediate error that names it
    (datasets would otherwise retry and then fail)."""
    if is_offline():
        raise UserError(f"source '{repo_id}' is a Hugging Face Hub id, but offline mode is on "
                        "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it first and point `path` at the local file")
    from datasets import load_dataset

    try:
        return load_dataset(repo_id, subset, split=split)
    except Exception as exc:  # network, auth, missing split and missing repo all surface as different types
        raise UserError(f"could not load '{repo_id}' (split '{split}') from the Hugging Face Hub: {exc}") from None
