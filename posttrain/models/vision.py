"""Vision-language models: loading processors, LoRA on the language tower, images in datasets.

Modality follows from the model folder and the data, as in TRL: a `config.json` with a `vision_config` is a VLM (loaded
with `AutoModelForImageTextToText` and its processor), and a dataset with an `images` column is vision data. The stages
stay the same TRL trainers; this module holds what only VLMs need (the tiny test VLMs are built in
`posttrain.models.tiny`):

- processors: without torchvision, processors that also handle video cannot be built by `AutoProcessor`; they are
  loaded image-only (same class name, no video processor), which is all image training needs;
- LoRA: on the language tower only; the vision tower and projector stay frozen unless the recipe lists them in
  `lora_modules_to_save` (then they are trained in full and saved in the adapter);
- data: `images` columns of file paths are decoded to PIL images; SFT rows become prompt/completion so TRL's vision
  collator renders each row in its own thinking mode (it ignores `chat_template_kwargs` for `messages` rows).

ERNIE-4.5-VL's per-token expert routing, which TRL's collators and GRPO do not lay out, is in `posttrain.moe_routing`.
"""

import json
from pathlib import Path

from ..errors import UserError, row_name
from .templates import chat_template_text, end_turns_with, vl_chat_template


# ----------------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------------
def is_vision_model(path: str | Path) -> bool:
    """Whether the model folder holds a vision-language model (its config has a `vision_config`)."""
    config = Path(path) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def has_processor_files(path: str | Path) -> bool:
    """Whether a tokenizer folder holds a processor (a saved one writes processor_config.json, some Hub repos only
    preprocessor_config.json): loading, exporting and the model card read it as one then."""
    return any((Path(path) / name).is_file() for name in PROCESSOR_CLASS_FILES[:2])


def is_processor(processing_class) -> bool:
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def text_tokenizer(processing_class):
    """The tokenizer inside a processor, or the tokenizer itself (EOS, padding and decoding live there)."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def has_images(dataset) -> bool:
    return dataset is not None and "images" in (dataset.column_names or [])


# ----------------------------------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------------------------------
# Where a folder may name its processor class: saved processors write processor_config.json, but Hub repos such as
# Qwen/Qwen2.5-VL-3B-Instruct have it only in preprocessor_config.json and tokenizer_config.json.
PROCESSOR_CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _processor_class(path: Path):
    import transformers

    for file in PROCESSOR_CLASS_FILES:
        config = path / file
        name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
        if name:
            return getattr(transformers, name, None)
    return None


def image_only(processor_cls):
    """`processor_cls` without its video processor, for loading and building image processors without torchvision.

    Why a class made at runtime (the one place that does it): `ProcessorMixin.__init__` checks every attribute
    against its declared class, and the video processor classes exist only with torchvision, so these processors
    cannot be built without it even though images never touch the video processor; transformers has no switch to
    leave it out. The subclass keeps the class name, so saved folders stay loadable by `AutoProcessor` where
    torchvision is installed; a class written out here would need a copy per processor family."""
    from transformers import ProcessorMixin

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):  # ERNIE-4.5-VL's own also copies its video processor's font
        return ProcessorMixin.save_pretrained(self, save_directory, **kwargs)

    return type(processor_cls.__name__, (processor_cls,),
                {"__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__})


def load_processor(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """A VLM's processor, image-only without torchvision, with the recipe's chat template and a pad token != EOS."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = Path(path)
    processor_cls = _processor_class(path)
    needs_video = processor_cls is not None and "video_processor" in processor_cls.get_attributes()
    if needs_video and not is_torchvision_available():
        processor = image_only(processor_cls).from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template == "chatml_vl":
        processor.chat_template = vl_chat_template(processor)
    elif chat_template:
        processor.chat_template = chat_template_text(chat_template)
    processor.tokenizer.chat_template = processor.chat_template
    end_turns_with(processor.tokenizer, chat_template)
    return processor


# ----------------------------------------------------------------------------------------------------------------------
# LoRA on the language tower
# ----------------------------------------------------------------------------------------------------------------------
def vision_modules(model) -> list[str]:
    """Names of the non-language parts of a VLM (vision tower, projector/merger): the children of its base model
    other than `language_model`, e.g. `vision_tower` and `multi_modal_projector` (LLaVA) or `visual` (Qwen2-VL)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    children = dict(base.model.named_children())
    if "language_model" not in children:
        raise UserError(f"{type(base).__name__}: no `model.language_model`; cannot tell the language tower from the "
                        "vision tower, so LoRA cannot be restricted to it")
    return [name for name in children if name != "language_model"]


def language_only_lora(peft_config, model):
    """Keep LoRA out of the vision tower and projector (PEFT's `all-linear` would take them too); modules listed in
    `modules_to_save` are trained in full instead."""
    names = "|".join(vision_modules(model))
    peft_config.exclude_modules = rf"(.*\.)?({names})(\..*)?"
    return peft_config


def freeze_vision(trainer, trainable: list[str] | None) -> list[str]:
    """Keep the modules a continued adapter brought back in full (its `modules_to_save`: the vision tower and
    projector trained in SFT) unchanged in this stage, unless the stage lists them in `trainable`; returns their names.

    `requires_grad_(False)` does not hold: PEFT makes an adapter's modules_to_save trainable whenever it activates the
    adapter, which TRL does after every reference pass, and with gradient checkpointing a flip between a forward and
    its recomputation is an error. So they stay out of the optimizer (built here, before training) and their gradients
    are zeroed, so that they do not count in gradient clipping either."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    trainable = trainable or []
    carried = {name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for name, _ in trainer.model.named_parameters()
               if ".modules_to_save.default." in name}
    missing = [module for module in trainable if module not in carried]
    if missing:  # a continued adapter keeps its own config: a new module to train in full cannot be added to it
        raise UserError(f"lora_modules_to_save lists {', '.join(missing)}, but this stage continues an adapter that "
                        "does not carry it, so it would stay frozen. List it in the first stage's "
                        "lora_modules_to_save (then it is trained only where a stage lists it), or drop it here")
    frozen = [(name, param) for name, param in trainer.model.named_parameters()
              if ".modules_to_save.default." in name
              and not any(f".{module}.modules_to_save." in f".{name}" for module in trainable)]
    if not frozen:
        return []
    for _, param in frozen:
        param.requires_grad_(False)
    trainer.create_optimizer()
    for _, param in frozen:
        param.requires_grad_(True)
        param.register_hook(torch.zeros_like)
    # nor in DDP's gradient all-reduce: a forward around DDP (UPO's pairs) could use them where DDP's own did not,
    # which DDP refuses ("Expected to mark a variable ready only once")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainer.model, [name for name, _ in frozen])
    return sorted({name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for name, _ in frozen})


def shard_vision_with_root(trainer) -> None:
    """Under FSDP (transformer-based wrapping, no layer classes named), only the language tower's layers become
    FSDP units of their own: the vision tower's blocks stay in the root unit, gathered at every forward. A unit of its
    own is gathered only when the vision tower runs, i.e. on a process whose rows have images; in a step where
    another process has text rows only (a mixed set, or UPO scoring a text placeholder on a process without pairs)
    that process's next gather is a decoder layer's, and the processes exchange mismatched collectives (gloo:
    "Received data size doesn't match expected size"; NCCL hangs)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if not trainer.is_fsdp_enabled:
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap is not None:
        return
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    layers, vision_side = set(base._no_split_modules or []), tuple(f"{name}." for name in vision_modules(base))
    plugin.transformer_cls_names_to_wrap = sorted({type(module).__name__ for name, module in base.model.named_modules()
                                                   if type(module).__name__ in layers
                                                   and not f"{name}.".startswith(vision_side)})


def reduce_unused_gradients(trainer) -> None:
    """Under FSDP2, weights that only image rows train (a projector in `lora_modules_to_save`, ERNIE-4.5-VL's vision
    experts) get a gradient only on a process whose rows have images, and FSDP2 reduce-scatters only the gradients a
    process has: a step in which another process had text rows only exchanged mismatched collectives. Those processes
    reduce-scatter zeros for them instead (torch's option for "multi-modal models, mixture of experts"; torch 2.13
    checked)."""
    import torch
    from packaging.version import Version
    from transformers import TrainerCallback

    if not trainer.is_fsdp_enabled or Version(torch.__version__).release < (2, 13):
        return

    class ReduceUnused(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # the model is sharded by now
            trainer.model_wrapped.set_reduce_scatter_unused_params(True)

    trainer.add_callback(ReduceUnused())


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def decode_images(dataset, data_dir: str | Path | None = None, name: str = "the dataset", rows: list[int] | None = None):
    """The `images` column as PIL images: file paths (data_prep's `build_sft_set`) are cast to `datasets.Image`.

    Paths relative to the data file resolve against its folder, `data_dir`, when the caller knows it (else against the
    current directory); every image, a file or stored in the data (a `datasets.Image` column), is checked up front, so
    a missing or broken one is an error naming its row (`name` names the dataset in it) before training starts, not
    an exception in the middle of it. `rows` are the rows' own indices in the file (from 0) where some were left out
    before, so that the error names the row the file has."""
    from datasets import Image, List

    if not has_images(dataset):
        return dataset
    feature = dataset.features["images"]
    if isinstance(feature, Image):  # one image per row, not a list: the collators expect a list
        _check_images(dataset.cast_column("images", Image(decode=False)), name, rows)
        return dataset.map(lambda row: {"images": [] if row["images"] is None else [row["images"]]},
                           features=_with_images(dataset, List(Image())))
    if isinstance(getattr(feature, "feature", None), Image):
        _check_images(dataset.cast_column("images", List(Image(decode=False))), name, rows)
        return _text_rows_without_images(dataset)
    if data_dir is not None:
        dataset = dataset.map(lambda row: {"images": [_under(data_dir, p) for p in row["images"] or []]})
    _check_images(dataset, name, rows)
    return dataset.cast_column("images", List(Image()))


def _text_rows_without_images(dataset):
    """Text rows among image rows (`images` null, as data_prep writes them beside embedded images) with an empty list:
    the processors take `[]` for a row without images and stop on None ("only a single or a list of entries")."""
    from datasets import Image, List

    if not dataset.data.column("images").null_count:
        return dataset
    undecoded = dataset.cast_column("images", List(Image(decode=False)))  # not every image decoded to be copied
    undecoded = undecoded.map(lambda images: {"images": images or []}, input_columns=["images"])  # the others unread
    return undecoded.cast_column("images", dataset.features["images"])


def _with_images(dataset, feature):
    features = dataset.features.copy()
    features["images"] = feature
    return features


def _under(folder: str | Path, path: str) -> str:
    return str(Path(folder) / path) if path and not Path(path).is_absolute() else path


def _check_images(dataset, name: str, rows: list[int] | None = None) -> None:
    """Each image of each row opens as one: a file path, or the bytes of an undecoded `datasets.Image`."""
    import io

    from PIL import Image as PILImage

    for index, images in enumerate(row["images"] for row in dataset.select_columns(["images"])):  # bytes: not all at once
        i = index if rows is None else rows[index]
        for j, image in enumerate(images if isinstance(images, list) else [images] if images else []):
            if isinstance(image, dict) and image.get("bytes") is None:  # `datasets.Image`'s path alone: a file
                image = image.get("path")
            if isinstance(image, dict):  # `datasets.Image`'s {"bytes", "path"}
                source, where = io.BytesIO(image["bytes"]), "(stored in the data)"
            elif isinstance(image, str):
                if not Path(image).is_file():
                    raise UserError(f"{name} {row_name(i)}: images[{j}] {image}: not found")
                source, where = image, image
            else:
                continue
            try:
                with PILImage.open(source) as opened:
                    opened.verify()
            except Exception as exc:  # PIL raises several types for a file that is not an image
                raise UserError(f"{name} {row_name(i)}: images[{j}] {where}: does not decode as an image "
                                f"({exc})") from exc


def as_rows(dataset) -> list[dict]:
    """The dataset as a list of rows, images decoded to PIL (`to_list()` would give their raw bytes), and image
    prompts written as text only with their image parts where TRL puts them (`with_image_parts`)."""
    if not has_images(dataset):
        return dataset.to_list()
    rows = list(decode_images(dataset))
    for row in rows:
        if "prompt" in row:
            row["prompt"] = with_image_parts(row["prompt"], len(row["images"] or []))
    return rows


def with_image_parts(messages, images: int):
    """A conversation whose contents are all strings, with `images` images: the image parts put before the text of
    its first user turn, as TRL's collators and GRPO do (`prepare_multimodal_messages`), so that rendering it
    writes the placeholders the processor expands; other conversations unchanged."""
    if not images or not isinstance(messages, list) or any(isinstance(m.get("content"), list) for m in messages):
        return messages
    out, placed = [], False
    for message in messages:
        if message.get("role") == "user" and not placed:
            message = {**message, "content": [{"type": "image"}] * images + [{"type": "text", "text": message["content"]}]}
            placed = True
        out.append(message)
    return out


def sft_rows_to_prompt_completion(dataset):
    """`messages` rows as prompt (every turn before the last reply) + completion (the last reply).

    TRL's vision collator renders `messages` batches with one set of template arguments, so a per-row thinking mode
    would be lost; for prompt-completion rows it applies each row's `chat_template_kwargs`, and the loss is on the
    completion only (as assistant-only loss would be for a single reply). Earlier replies of a multi-turn row are
    context, not trained.

    The new columns are typed as lists of `Json` messages, as data_prep stores `messages`: `datasets` would infer
    `Json` for the contents themselves where they mix text and parts, and it stores a string that parses as JSON as
    that JSON, so a turn "42" came back as the number 42 (and "0110…" as an overflowed integer), on which TRL's
    collator stopped."""
    from datasets import Json, List

    if "messages" not in dataset.column_names:
        return dataset

    def split(row):
        messages = row["messages"]
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    features = dataset.features.copy()
    del features["messages"]
    features.update(prompt=List(Json()), completion=List(Json()))
    return dataset.map(split, remove_columns=["messages"], features=features)


def message_text(content) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content or ""


# ----------------------------------------------------------------------------------------------------------------------
# Generation and scoring with images (evaluation, on-policy pairs)
# ----------------------------------------------------------------------------------------------------------------------
def encode(processor, prompts: list[str], images: list, device):
    """Rendered prompts with their images, left-padded for generation: input ids with each image expanded to its
    tokens, plus the processor's image tensors (`pixel_values`, `image_grid_thw`, `mm_token_type_ids`...)."""
    processor.tokenizer.padding_side = "left"
    flat = [list(row or []) for row in images]
    batch = processor(text=prompts, images=flat if any(flat) else None, padding=True, return_tensors="pt",
                      add_special_tokens=False)
    return batch.to(device)


def completion_layout(processor, prompts: list[str], images: list, completions: list[str], device) -> dict:
    """Rendered prompts with their images + completions, as model inputs with a `completion_mask` (for teacher-forced
    scoring). Laid out as TRL's vision preference collator does: processed prompts (left-padded) + tokenized
    completions (right-padded), flushed left, per-token type ids extended with zeros over the completion."""
    import torch
    from trl.trainer.utils import flush_left

    batch = encode(processor, prompts, images, device)
    processor.tokenizer.padding_side = "right"
    reply = processor.tokenizer(completions, padding=True, return_tensors="pt", add_special_tokens=False).to(device)
    input_ids = torch.cat([batch.pop("input_ids"), reply["input_ids"]], dim=1)
    prompt_mask = batch.pop("attention_mask")
    attention_mask = torch.cat([prompt_mask, reply["attention_mask"]], dim=1)
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), reply["attention_mask"]], dim=1)
    typed = [k for k in ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids") if k in batch]
    for key in typed:
        batch[key] = torch.cat([batch[key], torch.zeros_like(reply["input_ids"])], dim=1)
    attention_mask, input_ids, completion_mask, *types = flush_left(
        attention_mask, input_ids, completion_mask, *[batch[k] for k in typed])
    batch.update(zip(typed, types))
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
