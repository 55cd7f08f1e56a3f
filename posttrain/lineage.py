"""Lineage: what produced a stage's output (data fingerprints, base model, recipe, versions, commit, device)."""

import contextlib
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .io import read_json

PACKAGES = ("posttrain", "torch", "transformers", "trl", "peft", "datasets", "accelerate")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """posttrain's commit where it runs from a clone; None where it is installed (a site-packages inside the user's
    own repository, e.g. a project's .venv, would otherwise be credited with that repository's commit)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.splitlines()
    return lines[1] if result.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == repo else None


def device() -> str:
    from .devices import has_cuda

    if has_cuda():
        import torch

        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()})"


def environment() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "device": device()}


def dataset_fingerprint(name_or_path: str) -> str:
    """A data_prep card's fingerprint, a file/folder hash, or the Hub id itself (its revision is the Hub's); with the
    image files a parquet `images` column names folded in (see `image_files_fingerprint`)."""
    from .models import file_fingerprint

    path = Path(name_or_path)
    card = path / "card.json"
    if card.is_file() and json.loads(card.read_text()).get("fingerprint"):
        with contextlib.suppress(OSError, KeyError, TypeError):
            return _with_images(card_fingerprint(path), path)
    if path.exists():
        return _with_images(file_fingerprint(path), path)
    return f"hub:{name_or_path}"


def _with_images(fingerprint: str, path: Path) -> str:
    images = image_files_fingerprint(path)
    return hashlib.sha256(f"{fingerprint}{images}".encode()).hexdigest() if images else fingerprint


def image_files_fingerprint(path: Path) -> str | None:
    """sha256 over the path, size and modification time of each image file the `images` column of the parquet splits
    or of a JSON (Lines) data file names (`build_sft_set` and `build_preference_set` write paths, not bytes), None when
    there are none: an image edited in place changes what a stage trains on but not the data files, and must not let
    the stage be skipped as unchanged. Its size and time, as `datasets` fingerprints a local data file, not its bytes:
    every `posttrain run` computes this, and a set of 100k images is gigabytes to read."""
    folder = path if path.is_dir() else path.parent
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    images = set()
    for file in files:
        for row in _image_lists(file):
            # a path is read against the data's folder (`data.data_folder`); an absolute path stays itself
            images.update(str(folder / image) for image in row or [] if isinstance(image, str))
    if not images:
        return None
    digest = hashlib.sha256()
    for image in sorted(images):
        stat = Path(image).stat() if Path(image).is_file() else None
        digest.update(f"{image}\0{f'{stat.st_size}:{stat.st_mtime_ns}' if stat else 'missing'}\0".encode())
    return digest.hexdigest()


def _image_lists(file: Path):
    """Each row's `images` value of a parquet, .jsonl or .json data file; nothing for other files or a file that does
    not parse (loading it says what is wrong)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.suffix == ".parquet":
        schema = pq.read_schema(file)
        field = schema.field("images") if "images" in schema.names else None
        if field is not None and pa.types.is_list(field.type) and pa.types.is_string(field.type.value_type):
            yield from pq.read_table(file, columns=["images"]).column("images").to_pylist()
        return  # else no images, or embedded ones (their bytes are in the parquet file's own hash)
    if file.suffix not in (".jsonl", ".json"):
        return
    try:
        if file.suffix == ".jsonl":  # line by line, keeping only each row's images: a data file can be gigabytes
            with open(file, encoding="utf-8") as handle:
                rows = [_only_images(json.loads(line)) for line in handle if '"images"' in line]
        else:
            text = file.read_text(encoding="utf-8")
            rows = json.loads(text) if '"images"' in text else []  # a text-only file is not parsed
    except (OSError, ValueError):
        return
    for row in rows if isinstance(rows, list) else []:
        images = row.get("images") if isinstance(row, dict) else None
        if isinstance(images, list):
            yield images


def _only_images(row) -> dict | None:
    return {"images": row.get("images")} if isinstance(row, dict) else None


def card_fingerprint(folder: Path) -> str:
    """The fingerprint a data_prep card records (sha256 of its split files' sha256), computed from the split files as
    they are now: a split edited by hand after the card was written changes it."""
    splits = json.loads((folder / "card.json").read_text())["splits"].values()
    return hashlib.sha256("".join(sha256(folder / s["file"]) for s in splits).encode()).hexdigest()


def sha256(file: Path) -> str:
    """A file's sha256, read 1 MB at a time (`hashlib.file_digest` needs Python 3.11); data_prep's cards use it too."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """config.json content + weight file names and sizes: cheap, and changes whenever the weights are rewritten in
    another shape. Weights rewritten in the same shapes keep it; `base_identity` adds what tells those apart."""
    path = Path(path)
    parts = [(path / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(path.glob("*.safetensors"))]
    return "|".join(parts)


def base_identity(name_or_path: str, resolved: str | Path) -> dict:
    """What, beyond `model_fingerprint`, tells two versions of a base model apart when their shapes are the same:
    for a local folder (which can be saved over in place) `sampled_digest` of each weight file and `tokenizer_digest`,
    for a Hub snapshot its commit (`main` moves on). Empty for what the model cache builds (`tiny:`, GGUF conversions,
    whose cache key already holds the source's content), so those runs keep their stage hashes."""
    resolved = Path(resolved)
    if Path(name_or_path).expanduser().is_dir():
        return {"weights": sampled_weights(resolved), "tokenizer": tokenizer_digest(resolved)}
    snapshot = hub_snapshot(resolved)
    return {"revision": snapshot[1]} if snapshot else {}


def base_spelling(resolved: Path, identity: dict) -> str:
    """The base model's folder as the steps' hashes write it (`Pipeline.digest`): by what it holds, not where it lies,
    for the model cache and the Hugging Face cache lie elsewhere on another machine and a local folder can be moved. A
    Hub snapshot by its id and commit, a local folder by its `identity` (`base_identity`: weights and tokenizer), a
    folder the model cache built (named after its source's path: a GGUF file inside a virtual environment) by its
    config and `sampled_weights`."""
    if snapshot := hub_snapshot(resolved):
        return f"{{base {snapshot[0]}@{snapshot[1]}}}"
    content = {"model": model_fingerprint(resolved), **(identity or {"weights": sampled_weights(resolved)})}
    return f"{{base {hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]}}}"


def hub_snapshot(folder: Path) -> tuple[str, str] | None:
    """(`org/name`, commit) of a snapshot folder of the Hugging Face cache (`models--org--name/snapshots/<commit>`,
    where a Hub id cannot hold `--`), else None."""
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/"), folder.name


# a model folder's files that turn text (and images) into the ids a stage trains on: a tokenizer fixed in place
# changes every stage's training data with the same weights
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                   "*.tiktoken", "tekken.json", "chat_template*", "*processor_config.json", "tokenization_*.py")


def tokenizer_digest(folder: Path) -> str:
    """sha256 over the names and sha256 of a model folder's `TOKENIZER_FILES` (a few MB, read whole)."""
    files = sorted({file for pattern in TOKENIZER_FILES for file in folder.glob(pattern) if file.is_file()})
    return hashlib.sha256("".join(f"{file.name}:{sha256(file)}|" for file in files).encode()).hexdigest()


SAMPLED_BYTES = 1 << 20  # read at each of 8 places of a weight file: training changes every tensor


def sampled_digest(file: Path) -> str:
    """sha256 of a safetensors file's header and 1 MB at 8 evenly spaced places of its tensor data: any retrained full
    model differs there, for 8 MB read per file instead of all of it (hundreds of GB for the large models)."""
    digest = hashlib.sha256()
    size = file.stat().st_size
    with open(file, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(header))
        start = 8 + header
        for place in range(8):
            handle.seek(start + (size - start - SAMPLED_BYTES) * place // 7 if size - start > SAMPLED_BYTES else start)
            digest.update(handle.read(SAMPLED_BYTES))
    return digest.hexdigest()


def sampled_weights(folder: Path) -> str:
    """`sampled_digest` of each weight file of a model folder."""
    return "|".join(f"{p.name}:{sampled_digest(p)}" for p in sorted(folder.glob("*.safetensors")))


def weights_fingerprint(stage_dir: str | Path) -> str:
    """What a finished stage's weights are: the adapter file's sha256 (a few MB to a few hundred), or for a full model
    `sampled_digest` of each weight file. A stage trained again with the same inputs can save other weights (GPU
    kernels are not deterministic), so what samples from them keys on this, not on the stage's inputs hash."""
    from .models import file_fingerprint

    stage_dir = Path(stage_dir)
    adapter = stage_dir / "adapter_model.safetensors"
    return file_fingerprint(adapter) if adapter.is_file() else sampled_weights(stage_dir)


def other_previous(root: Path, record: dict) -> str | None:
    """Why a stage (its lineage `record`) was trained from other weights of its previous stage than those in `root`
    now, or None (the same, or a run recorded before `previous_weights`)."""
    previous, recorded = record.get("previous_stage"), record.get("previous_weights")
    if not (previous and recorded and (Path(root) / previous).is_dir()):
        return None
    return None if weights_fingerprint(Path(root) / previous) == recorded else \
        f"{previous} has been trained again since, to other weights"


def stage_lineage(stage: str, args: dict, inputs_hash: str, pipeline, previous: str | None) -> dict:
    from .models import describe_model

    recipe = pipeline.recipe
    return {
        "stage": stage,
        "inputs_hash": inputs_hash,
        "recipe": str(recipe.path),
        "recipe_fingerprint": recipe.fingerprint(),
        "base_model": {"name": recipe.base.model_name_or_path, "path": args["model_name_or_path"],
                       **describe_model(args["model_name_or_path"])},
        # the base model and chat template it trained on: a run stopped in the first stage after either was edited
        # leaves the stages of the old ones beside the new base evaluation (`runs.stale_stages`)
        "base_hash": pipeline.base_hash,
        "previous_stage": previous,
        # what the previous stage was when this one trained from it: a report tells a stage left over from before
        # its previous stage was trained again (`report.load.stale_stages`)
        "previous_inputs_hash": read_json(pipeline.root / previous / "lineage.json").get("inputs_hash") if previous
        else None,
        # and its weights: a previous stage trained again with the same inputs (its folder removed, on a GPU, whose
        # kernels are not deterministic) saves other weights, which this stage did not train from (`other_previous`)
        "previous_weights": weights_fingerprint(pipeline.root / previous) if previous else None,
        "datasets": {k: {"path": args[k], "fingerprint": dataset_fingerprint(args[k])}
                     for k in ("dataset_name", "upo_offline_dataset") if args.get(k)},
        **environment(),
    }
