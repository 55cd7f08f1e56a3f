"""The model card (`README.md`) of an exported stage, built only from what the run folder recorded.

Every number in the card is read from a `metrics.json` or `lineage.json` of the run; a value that was not recorded is
shown as "—", never estimated. The usage snippet is plain transformers/PEFT code that the tests execute against an
exported folder, so it stays runnable.
"""

import json
import re
from pathlib import Path

import yaml

from .console import console
from .io import read_json
from .models.moe_lora import peft_converts
from .models.vision import has_processor_files
from .runs import MACHINE_PATH_KEYS, finished_stages, in_run

MISSING = "—"

ADAPTER_SNIPPET = '''import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}"{base_revision}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {model})
tokenizer = AutoTokenizer.from_pretrained({model})
'''
MERGED_SNIPPET = '''from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({model}, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained({model})
'''
VISION_SNIPPET = {  # a VLM: its image-text-to-text class (the folder's tokenizer still chats in text)
    "from transformers import AutoModelForCausalLM, AutoTokenizer":
        "from transformers import AutoModelForImageTextToText, AutoTokenizer",
    "AutoModelForCausalLM.from_pretrained": "AutoModelForImageTextToText.from_pretrained",
}
GENERATE_SNIPPET = '''
messages = [{{"role": "user", "content": "What is 17 + 25?"}}]
# the chat template takes enable_thinking=True/False for thinking / non-thinking replies
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
# the reply ends with the chat template's end-of-turn token, which the tokenizer holds as its EOS
output = model.generate(**inputs, max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
'''


FILE_SUFFIXES = {".py", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".md", ".yaml", ".yml", ".arrow", ".gz",
                 ".zst", ".gguf", ".safetensors"}


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path or a file name (data cards list local sources as relative paths)."""
    return (bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not Path(name).exists()
            and Path(name).suffix.lower() not in FILE_SUFFIXES)


def write_card(out: Path, run: Path, stage: str, manifest: dict, model_id: str, license: str | None = None,
               revision: str | None = None) -> Path:
    """Write `out/README.md` for the export of `run`'s `stage` described by `manifest` (see `export.py`)."""
    run = Path(run)
    chain = _chain(run, stage)
    info = {step: _read(run, step) for step in ["base", *chain]}
    recipe = _recipe(run, info[stage]["lineage"])
    merged, vision = manifest["kind"] == "merged", has_processor_files(out)
    metadata = _metadata(manifest["base_model"], merged, chain, _hub_datasets(run, info),
                         license or default_license(manifest["base_model"], recipe["base"]), vision)
    body = [
        _title(run, stage, chain, manifest, recipe),
        "## Usage\n\n```python\n" + snippet(manifest["base_model"], model_id, merged, revision, vision=vision,
                                             base_revision=manifest.get("base_revision"),
                                             thinking=has_thinking_switch(out)) + "```"
        + _moe_note(out, merged, info[stage]["lineage"].get("base_model", {}).get("model_type")),
        _results(info),
        _training(run, chain, info, manifest["base_model"]),
        _recipe_section(recipe),
        _data(run, info),
        _lineage(info, chain),
        _verification(manifest),
    ]
    (out / "README.md").write_text(f"---\n{metadata}\n---\n\n" + "\n\n".join(b for b in body if b) + "\n")
    return out / "README.md"


MOE_NOTE = """

This adapter has LoRA on the MoE model's dense MLP layers (a dense first layer, the shared experts) as well as on its
experts. PEFT 0.21 and earlier load it without those layers' LoRA, and without a warning (huggingface/peft#3711):
load it with a PEFT release that includes huggingface/peft#3715, or use the merged export."""


def _moe_note(out: Path, merged: bool, model_type: str | None = None) -> str:
    """`MOE_NOTE` for an adapter trained with `models.moe_lora`: experts as parameter targets and dense layers under the
    names PEFT 0.21 moves to the experts, on a model PEFT converts (`model_type`, when recorded: not ERNIE-4.5-VL,
    whose experts posttrain targets itself and whose dense layers plain PEFT loads as they are)."""
    config = Path(out) / "adapter_config.json"
    if merged or not config.is_file() or (model_type and not peft_converts(model_type)):
        return ""
    config = json.loads(config.read_text())
    modules = config.get("target_modules") or []
    dense = {"gate_proj", "up_proj", "down_proj"} & set([] if isinstance(modules, str) else modules)
    return MOE_NOTE if dense and config.get("target_parameters") else ""


TINY_BASE = '''from posttrain.models import resolve_model  # {base} is a tiny test model that posttrain builds
'''


def has_thinking_switch(folder: Path) -> bool:
    """Whether the chat template saved in `folder` reads `enable_thinking` (posttrain's built-in ones do; a model's own
    template, with `chat_template: null`, mostly not)."""
    files = [*Path(folder).glob("chat_template.*"), Path(folder) / "tokenizer_config.json"]
    return any("enable_thinking" in path.read_text() for path in files if path.is_file())


def snippet(base: str, model_id: str, merged: bool, revision: str | None = None, vision: bool = False,
            base_revision: str | None = None, thinking: bool = True) -> str:
    model_id = f'"{model_id}"' + (f', revision="{revision}"' if revision else "")  # a pushed branch, not main
    # the Hub commit the adapter was trained on: the base's `main` moves on
    base_revision = f', revision="{base_revision}"' if base_revision else ""
    if merged:
        head = MERGED_SNIPPET.format(model=model_id)
    elif base.startswith("tiny:"):  # no Hub id or folder to name: the model posttrain trained on, built the same way
        head = TINY_BASE.format(base=base) + ADAPTER_SNIPPET.format(base=base, model=model_id,
                                                                    base_revision="").replace(
            f'"{base}"', f'resolve_model("{base}")')
    else:
        head = ADAPTER_SNIPPET.format(base=base, model=model_id, base_revision=base_revision)
    if vision:
        for text, replacement in VISION_SNIPPET.items():
            head = head.replace(text, replacement)
    usage = GENERATE_SNIPPET.format().split("\n")
    return head + "\n".join(line for line in usage if thinking or "enable_thinking" not in line)


# ---------------------------------------------------------------------------------------------------------- reading
def _chain(run: Path, stage: str) -> list[str]:
    """The trained stages up to `stage`: the exported adapter carries all of them (stages chain one adapter). Read as
    `stage_ref` found `stage`: from the stage folders when run.json is unreadable or lists no order."""
    order = [s for s in finished_stages(run) if s != "base"]
    return order[: order.index(stage) + 1]


def _read(run: Path, step: str) -> dict:
    """A step's records for the card; one that is damaged (emptied, cut short) is left out as unrecorded, with a
    warning: the exported stage's own files were checked before its export (`runs.stage_ref`)."""
    def load(name):
        path = run / step / name
        if name.endswith(".json"):
            return read_json(path, say=_left_out)
        try:
            record = yaml.safe_load(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError, yaml.YAMLError) as exc:
            record = _left_out(f"{path} is unreadable ({exc})")
        return record if isinstance(record, dict) else {}

    # paths as in this run folder, moved or copied since it ran (as `stage_ref` reads them): its data cards, not the
    # old folder's (gone, or another run's by now)
    resolved, root = load("resolved.yaml"), run.resolve()
    return {"metrics": load("metrics.json"), "lineage": in_run(resolved, root, load("lineage.json")),
            "resolved": in_run(resolved, root)}


def _left_out(problem: str) -> dict:
    console.print(f"[yellow]warning:[/yellow] {problem}; the model card shows its values as not recorded")
    return {}


def _recipe(run: Path, lineage: dict) -> dict:
    """The recipe the run used (`outputs/<run>/recipe.yaml`: the file with command-line overrides applied), its
    `base:` section, and whether the stage ran with exactly it (a later run with other overrides rewrites it)."""
    from .recipe import fingerprint

    path = run / "recipe.yaml"
    if not path.is_file():
        return {"path": str(path), "text": None, "base": {}, "same": False}
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    return {"path": lineage.get("recipe") or str(path), "text": text, "base": raw.get("base") or {},
            "same": fingerprint(raw) == lineage.get("recipe_fingerprint")}


def default_license(base: str, base_section: dict) -> str:
    """The base model's license where it is recorded locally (package metadata, cached Hub card), else "other"."""
    if base.startswith("tiny:"):
        return "apache-2.0"  # random weights generated by posttrain itself
    if base_section.get("gguf_package"):
        from importlib import metadata

        try:
            return (metadata.metadata(base_section["gguf_package"].replace("_", "-"))["License"] or "other").lower()
        except metadata.PackageNotFoundError:
            return "other"
    if is_hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        readme = try_to_load_from_cache(base, "README.md")
        if isinstance(readme, str):
            match = re.match(r"---\n(.*?)\n---", Path(readme).read_text(), re.S)
            license = (yaml.safe_load(match.group(1)) or {}).get("license") if match else None
            if isinstance(license, str):
                return license
    return "other"


def _sources(data: Path, say=None) -> list[dict]:
    """The sources a data set's card lists (none where it has no card, or one that no longer reads)."""
    sources = read_json(data / "card.json", say=say).get("sources")
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def _hub_datasets(run: Path, info: dict) -> list[str]:
    """Hub ids among the stages' datasets and the sources their data cards list (local files are not metadata)."""
    found = []
    for step in info.values():
        for entry in step["lineage"].get("datasets", {}).values():
            found.append(entry["path"])
            found += [s.get("path", "") for s in _sources(Path(entry["path"]))]
    return sorted({name for name in found if is_hub_id(name)})


# ---------------------------------------------------------------------------------------------------------- sections
def _metadata(base: str, merged: bool, chain: list[str], datasets: list[str], license: str,
              vision: bool = False) -> str:
    from huggingface_hub import ModelCardData

    tags = ["posttrain", "trl", *chain, *([] if merged else ["lora", f"base_model:adapter:{base}"])]
    data = ModelCardData(base_model=base if is_hub_id(base) else None, library_name="transformers" if merged else "peft",
                         pipeline_tag="image-text-to-text" if vision else "text-generation", license=license,
                         datasets=datasets or None,
                         tags=[t for t in tags if is_hub_id(base) or not t.startswith("base_model:")])
    return data.to_yaml()


def _title(run: Path, stage: str, chain: list[str], manifest: dict, recipe: dict) -> str:
    kind = ("the base model with the LoRA adapter merged in" if manifest["kind"] == "merged"
            else "a LoRA adapter (PEFT)")
    base = manifest["base_model"]
    carries = " (the stages train one adapter in turn, so it carries all of them)" if len(chain) > 1 else ""
    lines = [f"# {run.name} · {stage}", "",
             f"{kind[0].upper() + kind[1:]} for `{base}`, post-trained with posttrain (run `{run.name}`: "
             f"{' → '.join(chain)}). This is the model after the **{stage}** stage{carries}."]
    notes = [f"**Exported with `--force`**: {manifest['forced']}."] if manifest.get("forced") else []
    if recipe["base"].get("gguf_file"):
        notes.append(f"The base weights were dequantized from `{recipe['base']['gguf_file']}`"
                     + (f" (Python package `{recipe['base']['gguf_package']}`)" if recipe["base"].get("gguf_package")
                        else "")
                     + f", not taken from the Hub's `{base}` weights: they differ slightly, and so does the adapter's"
                       " behaviour on them.")
    if base.startswith("tiny:"):
        notes.append(f"`{base}` is posttrain's tiny random-weight test model (`posttrain.models.resolve_model`): this "
                     "export proves the plumbing, not model quality.")
    elif not is_hub_id(base):
        notes.append(f"The base model is a local folder (`{base}`); share it alongside, or edit "
                     "`base_model_name_or_path` in adapter_config.json.")
    return "\n".join(lines + [""] + [f"> {n}" for n in notes]) if notes else "\n".join(lines)


def _pct(value) -> str:
    return MISSING if value is None else f"{value:.1%}"


def _num(value, digits: int = 4) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _results(info: dict) -> str:
    rows = ["| model | accuracy | format | stop rate | held-out loss | n |", "|---|---|---|---|---|---|"]
    groups: dict[str, dict[str, str]] = {}
    for step, data in info.items():
        ev = data["metrics"].get("eval") or {}
        rows.append(f"| {step} | {_pct(ev.get('accuracy'))} | {_pct(ev.get('format'))} | {_pct(ev.get('stop_rate'))} "
                    f"| {_num(ev.get('heldout_loss'))} | {ev.get('n', MISSING)} |")
        for group, value in (ev.get("by_group") or {}).items():
            groups.setdefault(group, {})[step] = _pct(value)
    out = ["## Held-out results", "",
           "Greedy generation on the run's held-out split, scored by posttrain's reward functions (accuracy against "
           "the reference answer, think-tag format, stop rate = the reply ended with EOS), before training (base) "
           "and after each stage; read from each step's metrics.json.", "", *rows]
    if groups:
        steps = list(info)
        out += ["", "| accuracy by group | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
        out += [f"| {g} | " + " | ".join(v.get(s, MISSING) for s in steps) + " |" for g, v in groups.items()]
    samples = (list(info.values())[-1]["metrics"].get("eval") or {}).get("samples") or []
    if samples:
        out += ["", f"<details><summary>Sample replies after {list(info)[-1]}</summary>", "",
                "| prompt | reference | reply | correct |", "|---|---|---|---|"]
        out += [f"| {_cell(s.get('prompt'))} | {_cell(s.get('answer'))} | {_cell(s.get('completion'))} | "
                f"{s.get('correct', MISSING)} |" for s in samples]
        out += ["", "</details>"]
    return "\n".join(out)


def _cell(text) -> str:
    return MISSING if text is None else str(text).replace("|", "\\|").replace("\n", "⏎")


def _training(run: Path, chain: list[str], info: dict, base: str) -> str:
    out = ["## Training", "", "| stage | steps | train loss | wall time | processes |", "|---|---|---|---|---|"]
    for step in chain:
        metrics = info[step]["metrics"]
        train = metrics.get("train") or {}
        out.append(f"| {step} | {train.get('global_step', MISSING)} | {_num(train.get('train_loss'))} | "
                   f"{_num(metrics.get('wall_time_s'), 1)} s | {metrics.get('world_size', MISSING)} |")
    for step in chain:
        resolved = {k: v for k, v in info[step]["resolved"].items() if k not in MACHINE_PATH_KEYS}
        text = yaml.safe_dump(resolved, sort_keys=False).replace(str(run.resolve()), "{run}")
        logged = [e for e in info[step]["metrics"].get("log_history", []) if "loss" in e]
        out += ["", f"<details><summary>{step}: resolved arguments and last logged step</summary>", "",
                "```yaml", text.rstrip(), "```"]
        if logged:
            out += ["", "```json", json.dumps(logged[-1], indent=1, default=float), "```"]
        out += ["", "</details>"]
    return "\n".join(out)


def _recipe_section(recipe: dict) -> str:
    if not recipe["text"]:
        return "## Recipe\n\nThe run folder holds no recipe.yaml; the resolved arguments above are what ran."
    note = ("" if recipe["same"] else "\n\n> A later run of this folder used other overrides: the resolved "
            "arguments above are exactly what this stage ran with.")
    return f"## Recipe\n\n`{Path(recipe['path']).name}`:{note}\n\n```yaml\n{recipe['text'].rstrip()}\n```"


def _data(run: Path, info: dict) -> str:
    rows = ["| stage | dataset | fingerprint | sources (license, rows kept) |", "|---|---|---|---|"]
    for step, data in info.items():
        for key, entry in data["lineage"].get("datasets", {}).items():
            sources = _sources(Path(entry["path"]), say=_left_out)
            described = "; ".join(f"{s.get('name')} ({s.get('license', MISSING)}, {s.get('rows_kept', MISSING)})"
                                  for s in sources) or MISSING
            path = entry["path"].replace(str(run.resolve()), "{run}")
            label = f"{step} (offline pairs)" if key == "upo_offline_dataset" else step
            rows.append(f"| {label} | `{path}` | `{str(entry['fingerprint'])[:16]}` | {_cell(described)} |")
    return "## Data\n\n" + "\n".join(rows) if len(rows) > 2 else ""


def _lineage(info: dict, chain: list[str]) -> str:
    keys = [("inputs hash", lambda lin: lin.get("inputs_hash")), ("previous stage", lambda lin: lin.get("previous_stage")),
            ("recipe fingerprint", lambda lin: lin.get("recipe_fingerprint")),
            ("git commit", lambda lin: (lin.get("git_commit") or "")[:12] or None), ("device", lambda lin: lin.get("device"))]
    versions = sorted({k for s in chain for k in info[s]["lineage"].get("versions", {})})
    keys += [(name, lambda lin, n=name: lin.get("versions", {}).get(n)) for name in versions]
    rows = ["| | " + " | ".join(chain) + " |", "|---" * (len(chain) + 1) + "|"]
    rows += [f"| {label} | " + " | ".join(str(get(info[s]["lineage"]) or MISSING) for s in chain) + " |"
             for label, get in keys]
    return "## Lineage\n\nFrom each stage's lineage.json: what produced it.\n\n" + "\n".join(rows)


def _verification(manifest: dict) -> str:
    checks = json.dumps(manifest["verification"], indent=1, default=str)
    what = ("merged weights reloaded from this folder vs the adapter on the base model, same probe batch"
            if manifest["kind"] == "merged" else "this adapter on the base model vs the stage's own adapter")
    return f"## Export checks\n\nWritten by `posttrain export` and verified before the folder was renamed into place " \
           f"({what}):\n\n```json\n{checks}\n```"
