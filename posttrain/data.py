"""Loading the datasets a stage trains on, and rendering prompts with per-sample thinking mode.

Datasets come from `data_prep/` jobs (a folder with one parquet file per split), a local file (jsonl, json, parquet,
csv), a `save_to_disk` folder, or a Hub id. Every row may carry a `thinking` column: True renders the prompt so the model
thinks (`<think>…</think>` then the answer), False prefills an empty think block, missing/None leaves the template's
default. TRL's SFTTrainer reads per-row template switches from `chat_template_kwargs`, so we derive that column here.
"""

import json
import os
from pathlib import Path

from .errors import UserError

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_EXPECTED = {".jsonl": "one JSON object per line", ".json": "a JSON list of objects (or JSON Lines)",
             ".parquet": "a parquet table", ".csv": "comma-separated rows under a header line"}


def split_name(dataset: str, split: str) -> str:
    """How messages name one split of a dataset: `<dataset> (<split>)`."""
    return f"{dataset} ({split})"


def load_split(name_or_path: str, split: str = "train", dataset_config: str | None = None,
               allow_empty: bool = False):
    """Load one split of a dataset.

    Args:
        name_or_path (`str`):
            A `data_prep` output folder (`<split>.parquet` files), a `save_to_disk` folder, a data file, or a Hub id.
        split (`str`, *optional*, defaults to `"train"`):
            Split name. For a single data file, `train` is the whole file.
        allow_empty (`bool`, *optional*, defaults to `False`):
            A data file without rows is a split without rows, not an error (a held-out split the caller skips).
    """
    from datasets import load_from_disk

    path = Path(name_or_path)
    if path.is_dir():
        parquet = path / f"{split}.parquet"
        if parquet.is_file():
            return _load_file(parquet, split, allow_empty)
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            loaded = load_from_disk(str(path))
            if hasattr(loaded, "keys"):
                if split not in loaded:
                    raise UserError(f"{path}: no split '{split}' (has: {', '.join(loaded.keys())})")
                return loaded[split]
            return loaded
        have = ", ".join(sorted(p.name for p in path.glob("*.parquet"))) or "no parquet files"
        raise UserError(f"{path}: no '{split}.parquet' ({have}) and not a save_to_disk folder")
    if path.suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise UserError(f"dataset file not found: {path}")
        return _load_file(path, split, allow_empty)
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise UserError(f"dataset '{name_or_path}' is not a folder, a data file or a Hub id of the form 'org/name'")
    return _load_hub(name_or_path, split, dataset_config)


def folder_splits(path: Path) -> list[str] | None:
    """The splits `load_split` finds in a local folder: its `<split>.parquet` files and a `save_to_disk` folder's
    splits; None where any name loads (one saved `Dataset`) or the folder holds no dataset (its loading says so)."""
    splits = sorted(p.stem for p in path.glob("*.parquet"))
    if (path / "dataset_dict.json").is_file():
        return splits + json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if (path / "dataset_info.json").is_file():
        return None
    return splits or None


def _image_lists(dataset):
    """TRL's one-image-a-row formats (an `image` column, or one `datasets.Image` per row in `images`) as the list of
    images per row that every stage and gate reads from `images` (TRL's collators make the same list)."""
    from datasets import Image, List

    column = "image" if "image" in dataset.column_names and "images" not in dataset.column_names else "images"
    feature = dataset.features.get(column)
    if column == "images" and not isinstance(feature, Image):
        return dataset
    features = dataset.features.copy()
    del features[column]
    features["images"] = List(Image(decode=False)) if isinstance(feature, Image) else List(feature)
    if isinstance(feature, Image):  # wrapped undecoded: no image is decoded to be listed
        dataset = dataset.cast_column(column, Image(decode=False))
    listed = dataset.map(lambda row: {"images": [row[column]] if row[column] else []}, features=features,
                         remove_columns=[column] if column == "image" else None)
    return listed.cast_column("images", List(Image())) if isinstance(feature, Image) else listed


def _load_file(path: Path, split: str, allow_empty: bool = False):
    """A local data file as one split; an unreadable or empty file is a UserError naming the file (and the first bad
    line of a JSON Lines file) instead of datasets' and Arrow's tracebacks."""
    from datasets import load_dataset

    expected = _EXPECTED[path.suffix]
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); expected {expected}")
    if path.suffix == ".parquet" and _parquet_rows(path) == 0:  # load_dataset: '"test" corresponds to no data!'
        if not allow_empty:
            raise UserError(f"{path}: no rows; expected a non-empty parquet file")
        import pyarrow.parquet as pq
        from datasets import Dataset
        from datasets.table import InMemoryTable

        return Dataset(InMemoryTable(pq.read_table(path)))  # its schema holds the features `to_parquet` wrote
    if _FILE_BUILDERS[path.suffix] == "json" and (line := _too_deep_json_line(path)):
        raise UserError(f"{path}: line {line} is nested too deeply to read; expected {expected}")
    try:
        dataset = load_dataset(_FILE_BUILDERS[path.suffix], data_files={split: str(path)}, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets and Arrow raise many types for one cause: an unreadable file
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]} ({_root_cause(exc)})"
                        f"{_bad_json_line(path) or _non_utf8_line(path)}; expected {expected}") from exc
    dataset = _image_lists(dataset)
    if path.suffix != ".parquet" and (where := _non_utf8_line(path)):
        raise UserError(f"{path}: not UTF-8 text{where}; expected UTF-8: re-save the file as UTF-8 (from GBK: iconv "
                        "-f GBK -t UTF-8)")
    if len(dataset) == 0 and not allow_empty:
        raise UserError(f"{path}: no rows; expected a non-empty {path.suffix[1:]} file")
    return _stored_images_under(dataset, path.parent)


def _stored_images_under(dataset, folder: Path):
    """A `datasets.Image` column whose images are paths alone (`to_parquet` keeps no bytes of images given by
    relative path) with those paths read against the data file's folder, as image paths written as text are, not
    against the current directory."""
    import pyarrow.compute as pc
    from datasets import Image, List

    feature = dataset.features.get("images")
    single = isinstance(feature, Image)
    if not single and not isinstance(getattr(feature, "feature", None), Image):
        return dataset
    stored = dataset.data.column("images").combine_chunks()
    stored = stored if single else pc.list_flatten(stored)
    if not pc.any(pc.is_null(pc.struct_field(stored, "bytes"))).as_py():
        return dataset

    def under(image):
        relative = image and image["bytes"] is None and image["path"] and not Path(image["path"]).is_absolute()
        return {**image, "path": str(folder / image["path"])} if relative else image

    raw = dataset.cast_column("images", Image(decode=False) if single else List(Image(decode=False)))
    raw = raw.map(lambda row: {"images": under(row["images"]) if single else [under(i) for i in row["images"] or []]})
    return raw.cast_column("images", feature)


def _too_deep_json_line(path: Path) -> int | None:
    """The first line nested too deeply for Python's json (~1,000 levels), else None. datasets reads JSON with
    pyarrow, whose reader overflows its stack on a row nested ~20,000 deep (SIGSEGV: the stage dies without a word);
    json raises instead. Only lines with that many brackets are parsed, so a usual file costs one pass of counting."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.count(b"[") + line.count(b"{") > 1000:
                try:
                    json.loads(line)
                except RecursionError:
                    return number
                except ValueError:
                    pass  # load_dataset's error (and `_bad_json_line`) say what is wrong with it
    return None


def _parquet_rows(path: Path) -> int | None:
    """The rows a parquet file's footer counts; None for a file that is no parquet (load_dataset's error says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except Exception:  # noqa: BLE001 - Arrow raises several types for a file that is not parquet
        return None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__


def _non_utf8_line(path: Path) -> str:
    """"; line N: byte 0x.. at column M is not UTF-8" for the first line of a text data file that is not UTF-8, else
    "". pyarrow's JSON reader keeps such bytes: a GBK file loaded, and the stage failed later on a UnicodeDecodeError
    naming no file. Read in whole lines 16 MB at a time (a line at a time took as long again as loading the file)."""
    lines = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24) + handle.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as exc:
                line_start = chunk.rfind(b"\n", 0, exc.start) + 1
                lines += chunk.count(b"\n", 0, exc.start)
                return (f"; line {lines + 1}: byte 0x{chunk[exc.start]:02x} at column {exc.start - line_start + 1} "
                        "is not UTF-8")
            lines += chunk.count(b"\n")
    return ""


def _bad_json_line(path: Path) -> str:
    """"; line N: <reason>" for the first line of a .jsonl file that is not a JSON object, else ""."""
    import json

    if path.suffix != ".jsonl":
        return ""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # json recurses once per level: a row nested thousands deep
                return f"; line {number}: not JSON ({exc})"
            if not isinstance(row, dict):
                return f"; line {number}: a {type(row).__name__}, not a JSON object"
    return ""


def _load_hub(repo_id: str, split: str, dataset_config: str | None):
    from datasets import load_dataset

    from .models.load import datasets_offline

    offline = datasets_offline()
    try:
        return load_dataset(repo_id, dataset_config, split=split)
    except Exception as exc:  # datasets raises several types here; the advice is the same
        hint = " (offline mode is on and it is not in the local cache)" if offline else ""
        raise UserError(
            f"could not load dataset '{repo_id}' split '{split}' from the Hugging Face Hub{hint}: {exc}"
        ) from exc


def template_kwargs(thinking: bool | None, extra: dict | None = None) -> dict:
    """A chat template's arguments: `extra` (a row's tools, GRPO's `chat_template_kwargs`) with the thinking mode, when
    there is one, as `enable_thinking` over theirs."""
    kwargs = dict(extra or {})
    if thinking is not None:
        kwargs["enable_thinking"] = bool(thinking)
    return kwargs


def render_prompt(tokenizer, messages: list[dict], thinking: bool | None = None, extra: dict | None = None) -> str:
    """The chat-template text of `messages` followed by the assistant header, in the row's thinking mode (and with
    the template arguments in `extra`)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs(thinking, extra))


def with_template_kwargs(dataset):
    """Add TRL's per-row `chat_template_kwargs` column from our `thinking` column (SFT reads it per row)."""
    if "thinking" not in dataset.column_names or "chat_template_kwargs" in dataset.column_names:
        return dataset

    def add(row):
        thinking = row["thinking"]
        return {"chat_template_kwargs": {} if thinking is None else {"enable_thinking": bool(thinking)}}

    return dataset.map(add)


def prompt_text(tokenizer, row: dict) -> str:
    """A preference row's prompt as TRL reads it: a text prompt as it is, a conversation rendered with the row's
    `tools` and thinking mode, as `preference_texts` renders it (without rendering the replies)."""
    prompt = row["prompt"]
    return prompt if isinstance(prompt, str) else render_prompt(tokenizer, prompt, extra=_row_template_kwargs(row))


def _row_template_kwargs(row: dict) -> dict:
    """The chat template's arguments for a conversation row: its `tools` (a list, or JSON text), its
    `chat_template_kwargs` and its `thinking` column."""
    tools = row.get("tools")
    return template_kwargs(row.get("thinking"), {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                                                 **(row.get("chat_template_kwargs") or {})})


def preference_texts(tokenizer, row: dict, eos: str) -> tuple[str, str, str]:
    """A preference row's (prompt, chosen, rejected) text as TRL's DPOTrainer tokenizes it (`tokenize_fn` in
    trl/trainer/dpo_trainer.py): a text row as it is, each reply ending in `eos`; a conversation rendered whole with
    the row's `tools` and thinking mode, each reply being what its rendering adds after the prompt's (tool calls and
    end-of-turn marker included), the prompt cut where the renderings part."""
    if isinstance(row["prompt"], str):
        return row["prompt"], *(text if text.endswith(eos) else text + eos
                                for text in (completion_text(row["chosen"]), completion_text(row["rejected"])))
    prompt, (chosen, rejected) = conversation_replies(tokenizer, row, [row["chosen"], row["rejected"]])
    return prompt, chosen, rejected


def conversation_replies(tokenizer, row: dict, replies: list) -> tuple[str, list[str]]:
    """A conversation row's prompt and `replies` (each a text or a list of messages) as the chat template renders each
    exchange whole, with the row's `tools` and thinking mode, as TRL's trainers tokenize them: each reply is what its
    rendering adds after the prompt's (tool calls, tool results, later turns and end-of-turn markers included), the
    prompt cut where the renderings part."""
    kwargs = _row_template_kwargs(row)
    prompt = render_prompt(tokenizer, row["prompt"], extra=kwargs)
    whole = [tokenizer.apply_chat_template(
        row["prompt"] + (reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]),
        tokenize=False, **kwargs) for reply in replies]
    cut = min(len(os.path.commonprefix([prompt, text])) for text in whole)
    return prompt[:cut], [text[cut:] for text in whole]


def data_folder(name_or_path: str) -> Path | None:
    """The local folder a dataset's relative paths (its images) are written against: a data file's folder, or the
    dataset folder itself; None for a Hub id."""
    path = Path(name_or_path)
    return path.parent if path.is_file() else path if path.is_dir() else None


def is_data_file(name_or_path: str) -> bool:
    """Whether a dataset name is one local data file, which holds one split: any split name reads the whole file."""
    return Path(name_or_path).suffix in _FILE_BUILDERS


def opens_think(prompt) -> bool:
    """Whether a rendered text prompt ends by opening the think block (the generation prompt of Qwen3.5's,
    DeepSeek-R1's and ERNIE-4.5-VL's own templates with thinking on): the reply continues inside it."""
    return isinstance(prompt, str) and prompt.rstrip().endswith("<think>")


# The names transformers hands a chat template a reply's reasoning under, in its order (it fills `reasoning_content`
# from the others): TRL's and OpenAI's, gpt-oss's, and the short one
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def reasoning_key(message: dict) -> str | None:
    """The name a message's reasoning is under: the first of `REASONING_FIELDS` that holds text, else the first that
    is set (None or absent: parquet pads the keys); an empty `reasoning_content` beside a filled `reasoning` hid it."""
    present = [key for key in REASONING_FIELDS if message.get(key) is not None]
    return next((key for key in present if message[key] != ""), present[0] if present else None)


def message_reasoning(message: dict):
    """A message's reasoning (`reasoning_key`), or None."""
    key = reasoning_key(message)
    return None if key is None else message[key]


def reply_text(completion) -> str:
    """All of a reply, for telling two replies apart: a string, or its messages' reasoning, contents and tool calls (a
    reply that only calls a tool has no content; two that give one answer after other reasoning are a pair)."""
    if isinstance(completion, list):
        parts = []
        for message in completion:
            if not isinstance(message, dict):
                raise TypeError(f"unexpected message: {type(message).__name__}")
            calls = message.get("tool_calls")
            parts.append(str(message_reasoning(message) or "") + str(message.get("content") or "")
                         + (json.dumps(called(calls), sort_keys=True) if calls else ""))
        return "\n".join(parts)
    return completion_text(completion)


def has_tool_turns(row: dict) -> bool:
    """Whether a preference row's chosen or rejected reply holds a tool result (a `tool` turn): text the model did not
    write, which DPO and the held-out preference accuracy leave out of the scored tokens."""
    return any(isinstance(side, list) and any(m.get("role") == "tool" for m in side)
               for side in (row["chosen"], row["rejected"]))


def called(calls) -> list:
    """What tool calls do, to tell replies apart: their functions and arguments, without the `id` that only links a
    call to its result (two samples of one call get two random ids)."""
    return [{k: v for k, v in call.items() if k != "id"} if isinstance(call, dict) else call for call in calls or []]


def completion_text(completion) -> str:
    """Text of a completion in either TRL format: a string, or a list of messages whose last one is the reply."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    raise TypeError(f"unexpected completion format: {type(completion).__name__}")
