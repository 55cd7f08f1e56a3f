"""`posttrain export`: turn a run's stage into a self-contained folder a stranger can load, and optionally push it.

    posttrain export outputs/<run> [--stage dpo] [--merge [--dtype bf16]] [--out DIR] [--push-to-hub ORG/NAME]

The folder holds either the stage's LoRA adapter (only the trained "default" adapter, never TRL's frozen "ref" copy)
with `base_model_name_or_path` set to the recipe's base model name instead of our cache path, or, with `--merge`, the
base model with the adapter merged in. Either way it carries the tokenizer with the recipe's chat template and a model
card (`model_card.py`) built from the run's own metrics and lineage.

Nothing is trusted: the folder is written to a hidden temporary sibling, loaded back from disk and compared with the
stage's adapter on the base model (same logits on a probe batch, tied embeddings still tied), and only then renamed
into place. Every check's result goes into `export.json` and the card. Safetensors only.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .console import console
from .errors import UserError, make_folder
from .hub import check_license, create_repo, hub_token, push_folder
from .io import replace_dir, write_json
from .lineage import hub_snapshot
from .models.load import check_tokenizer_files
from .runs import stage_ref

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
# Relative error ||merged - reference|| / ||reference|| over the probe logits, the reference being the stage's adapter
# on the fp32 base. Merging in fp32 is exact up to float rounding (~1e-6 measured); lost or untied lm_head weights, a
# wrong adapter or a failed merge give errors near 1. 16-bit exports get a tolerance measured on the spot (see
# `write_merged`) plus this much.
TOLERANCE = 1e-4
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
PROBE_CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green and blue."},
     {"role": "user", "content": "And one more, please?"}],
]


@dataclass
class ExportRequest:
    """What `posttrain export` was asked to do (the CLI flags, one field each)."""

    run: str
    stage: str | None = None
    merge: bool = False
    dtype: str | None = None
    out: str | None = None
    overwrite: bool = False
    license: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    force: bool = False


def run_export(request: ExportRequest) -> Path:
    """Check everything that can fail cheaply, export and verify into a temp folder, rename it, push if asked."""
    from .model_card import write_card

    token = hub_token(request.push_to_hub) if request.push_to_hub else None  # before any export work
    ref = stage_ref(request.run, request.stage, warn=False)  # the base is refused below, saying why
    forced = _check_promoted(ref, request.force)
    if ref.stage == "base":
        raise UserError(_base_problem(ref.run, request.stage))
    if request.dtype and not request.merge:
        raise UserError("--dtype applies to merged weights; add --merge (the adapter is exported as trained)")
    if (request.private or request.revision) and not request.push_to_hub:
        raise UserError("--private and --revision describe the Hub upload; add --push-to-hub ORG/NAME")
    if request.license is not None:
        check_license(request.license)
    ref.check_base_model()  # before its config.json is read for the dtype
    dtype = DTYPES.get(request.dtype) if request.dtype else DTYPES.get(_config_dtype(ref.base_model), "float32")
    if dtype is None:
        raise UserError(f"--dtype {request.dtype}: choose one of {', '.join(sorted(set(DTYPES)))}")
    _check_adapter_folder(ref)
    check_tokenizer_files(ref.tokenizer)  # saved beside the weights, after minutes of merging
    out = Path(request.out) if request.out else ref.run / "exports" / (f"{ref.stage}-merged" if request.merge
                                                                         else ref.stage)
    _check_not_in_run(out, ref.run)
    if out.exists() and not request.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out to choose another folder")
    if out.exists():
        _check_replaceable(out, ref.run)
    make_folder(out.parent, "the folder to export into")
    if request.push_to_hub:  # the network, the token and its write access, before minutes of export work
        create_repo(request.push_to_hub, token, request.private, request.revision)

    def write(tmp: Path) -> None:
        console.print(f"exporting {ref.run.name}/{ref.stage} ({'merged, ' + dtype if request.merge else 'adapter'})…")
        before = _stage_stamp(ref)
        checks = write_merged(ref, tmp, dtype) if request.merge else write_adapter(ref, tmp)
        base, revision = public_base(ref.run, ref.stage)
        manifest = {"run": ref.run.name, "stage": ref.stage, "kind": "merged" if request.merge else "adapter",
                    "base_model": base, "base_revision": revision, "verification": checks,
                    **({"forced": forced} if forced else {})}
        write_json(tmp / "export.json", manifest)
        write_card(tmp, ref.run, ref.stage, manifest, model_id=request.push_to_hub or str(out),
                   license=request.license, revision=request.revision if request.push_to_hub else None)
        if _stage_stamp(ref) != before:
            raise UserError(f"{ref.run / ref.stage} was replaced while it was exported (the run trained the stage "
                            "again): the weights and the card could describe different trainings, so nothing was "
                            "written; export it again once the run has finished")

    replace_dir(out, write)
    console.print(f"[green]✓ exported[/green] {out}")
    if request.push_to_hub:
        url = push_folder(out, request.push_to_hub, token, request.revision,
                          f"posttrain export of {ref.run.name}/{ref.stage}")
        console.print(f"[green]✓ pushed[/green] {url}")
    return out


# ---------------------------------------------------------------------------------------------------------- the stage
def _trained(run: Path) -> list[str]:
    from .runs import finished_stages

    return [s for s in finished_stages(run) if s != "base"]


def _base_problem(run: Path, asked: str | None) -> str:
    """Why there is nothing to export when the stage is the base model: asked for, or every trained stage is stale
    (`stage_ref` falls back to the base then)."""
    from .runs import stale_stages

    trained, stale = _trained(run), stale_stages(run)
    if not asked and trained and all(s in stale for s in trained):
        reasons = "; ".join(f"{s}: {stale[s]}" for s in trained)
        return (f"{run}: every trained stage is stale ({reasons}), not what the run's chain now gives; run "
                f"`posttrain run` on its recipe again to train them, or pass --stage {trained[-1]} --force to export "
                "one anyway")
    return f"{run}: 'base' is the unmodified base model; export a trained stage ({', '.join(trained) or 'none finished yet'})"


def _check_promoted(ref, force: bool) -> str | None:
    """A stage its promote gate rejected (worse than the step before it), or one left from before its previous stage
    was trained again (`runs.stale_stages`), is not shared by accident. Returns why, when `force` exports it anyway:
    the card says so (the earlier stages it shows are the run's current ones, not those this stage came from)."""
    from .promotion import blocks_chain
    from .runs import stage_record, stale_stages

    metrics_path = ref.run / ref.stage / "metrics.json"
    record = stage_record(metrics_path).get("promotion") if metrics_path.is_file() else None
    if blocks_chain(record) and not force:
        earlier = f"export {record['against']} with --stage {record['against']}, or " if record["against"] != "base" \
            else ""
        raise UserError(f"{ref.run}: stage '{ref.stage}' failed its promote gate ({record['gate']['reason']}); "
                        f"{earlier}pass --force to export it anyway")
    stale = stale_stages(ref.run).get(ref.stage)
    if stale and not force:
        raise UserError(f"{ref.run}: stage '{ref.stage}' is stale ({stale}): it is not what "
                        f"the run's chain now gives; run the stages after that one again, or pass --force to export "
                        "it anyway")
    if blocks_chain(record):
        return f"its promote gate rejected it ({record['gate']['reason']})"
    return f"it is stale ({stale}): the earlier stages shown here are not the ones it was trained from" if stale \
        else None


def _check_not_in_run(out: Path, run: Path) -> None:
    """Inside the run folder an export goes under RUN/exports/: a stage's folder, its `.partial` or the data are
    replaced or removed by the run when it trains or builds them again, and the export with them, unsaid."""
    run, where = run.resolve(), out.resolve()
    if run in where.parents and run / "exports" not in [where, *where.parents]:
        raise UserError(f"--out {out}: it is inside the run's own folders, which the run replaces when it runs "
                        f"again; export under {run / 'exports'} (the default) or outside the run folder")


def _check_replaceable(out: Path, run: Path) -> None:
    """`--overwrite` replaces a previous export (a folder with export.json) or an empty folder, nothing else: not the
    run, a stage or a folder of the user's files."""
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise UserError(f"--out {out}: it holds the run {run} itself; export into a folder of its own")
    if not out.is_dir():
        raise UserError(f"--out {out}: it is a file; --overwrite replaces a previous export's folder only")
    if any(out.iterdir()) and not (out / "export.json").is_file():
        raise UserError(f"--out {out}: it is not a previous export (no export.json), so --overwrite would delete "
                        "files posttrain did not write; choose another folder or empty it first")


def _stage_stamp(ref) -> list:
    """The stage's lineage and weights as files (inode, modification time, size): a run that trains the stage again
    writes a temporary sibling and renames it into place, so they differ after it. `export` takes no run lock, so
    that a finished stage can be exported while the run goes on to the next."""
    files = [ref.run / ref.stage / name for name in ("lineage.json", "adapter_model.safetensors")]
    return [(f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files]


def _check_adapter_folder(ref) -> None:
    folder = Path(ref.adapter)
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").is_file():
        raise UserError(f"{folder} holds a pickled adapter (adapter_model.bin); posttrain exports safetensors only")
    if not all((folder / name).is_file() for name in ADAPTER_FILES):
        full = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
        raise UserError(f"{folder} holds no LoRA adapter ({' + '.join(ADAPTER_FILES)})"
                        + ("; this stage trained all weights (use_peft: false), so the folder already is a "
                           "standalone model" if full else ""))


def _config_dtype(model_path: str) -> str:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def public_base_name(run: Path, stage: str) -> str:
    """The base model as the recipe named it (a Hub id, `tiny:<arch>`), or an absolute path for a local folder."""
    return public_base(run, stage)[0]


def public_base(run: Path, stage: str) -> tuple[str, str | None]:
    """(name, Hub commit) of the base model as a stranger loads it: a Hub id (also for a folder of the Hub cache the
    recipe named) with the commit of the snapshot the run trained on, since `main` moves on and the adapter on other
    weights is another model; else the recipe's name (`tiny:<arch>`, a GGUF's Hub id) or a local folder's absolute
    path, with no commit."""
    lineage = json.loads((Path(run) / stage / "lineage.json").read_text())
    name, snapshot = lineage["base_model"]["name"], hub_snapshot(Path(lineage["base_model"]["path"]))
    local = Path(name).expanduser()
    if snapshot and (not local.is_dir() or local.resolve() == Path(lineage["base_model"]["path"]).resolve()):
        return snapshot
    return (str(local.resolve()) if not name.startswith("tiny:") and local.is_dir() else name), None


# ---------------------------------------------------------------------------------------------------------- writing
def write_adapter(ref, out: Path) -> dict:
    """Copy the trained adapter (root files only: `ref/` is TRL's frozen copy), fix its base name, add the tokenizer."""
    from safetensors.torch import load_file

    src = Path(ref.adapter)
    shutil.copyfile(src / "adapter_model.safetensors", out / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    # PEFT's AutoPeftModel loads the base at `revision`: the snapshot this adapter was trained on
    config["base_model_name_or_path"], config["revision"] = public_base(ref.run, ref.stage)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_tokenizer(ref.tokenizer, out)
    tensors = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    if not tensors or not lora_b or all(int(t.count_nonzero()) == 0 for t in lora_b):
        raise UserError(f"{src}/adapter_model.safetensors is empty or untrained (every lora_B is zero); nothing "
                        "worth exporting. Re-run the stage.")
    checks = compare_adapter_reload(ref, out)
    return {"adapter_tensors": len(tensors), "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
            **checks}


def write_merged(ref, out: Path, dtype: str) -> dict:
    """Merge the adapter into the base in fp32, cast, save; reload from disk and compare logits with adapter-on-base."""
    import gc

    import torch

    from .models import load_model
    from .models.vision import text_tokenizer

    model = load_model(ref.base_model, adapter=ref.adapter, dtype="float32", trust_remote_code=ref.trust_remote_code)
    _refuse_lora_on_tied_embeddings(model, ref)
    probe = probe_batch(ref.tokenizer)
    reference = _logits(model, probe)
    merged = model.merge_and_unload()
    merged.to(getattr(torch, dtype))
    tokenizer = save_tokenizer(ref.tokenizer, out)
    stop_at_reply_end(merged, text_tokenizer(tokenizer).eos_token_id)
    merged.save_pretrained(out)
    del model, merged
    gc.collect()
    reloaded, checks = load_merged_checked(out, dtype)
    error = relative_error(_logits(reloaded, probe), reference, probe["attention_mask"])
    del reloaded
    tolerance = TOLERANCE
    if dtype != "float32":
        # 16-bit weights and activations alone move the logits by about as much as merging does (~3% in bf16 on
        # SmolLM2's 30 layers): allow twice what the unmerged adapter-on-base gives when run in the same dtype.
        gc.collect()
        unmerged = relative_error(_logits(load_model(ref.base_model, adapter=ref.adapter, dtype=dtype,
                                                      trust_remote_code=ref.trust_remote_code), probe),
                                  reference, probe["attention_mask"])
        tolerance = 2 * unmerged + TOLERANCE
        checks["unmerged_relative_error_in_dtype"] = unmerged
    checks.update(dtype=dtype, logits_relative_error=error, tolerance=tolerance)
    if not error <= tolerance:
        raise RuntimeError(f"merged weights do not reproduce adapter-on-base: relative logit error {error:.2e} > "
                           f"{tolerance:.1e} ({dtype}); the export was not written")
    return checks


def stop_at_reply_end(model, eos: int | None) -> None:
    """The generation config stops at the tokenizer's EOS (`eos`) too: the recipe's chat template ends a reply with it
    (ERNIE's <|end_of_sentence|> where the model's config says </s>, a Qwen base model's <|im_end|>), and `generate()`,
    pipelines and serving engines stop where the generation config says, not the tokenizer."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if eos is not None and eos not in ids:
        model.generation_config.eos_token_id = [eos, *ids]  # the model's own EOS still stops it


def _refuse_lora_on_tied_embeddings(model, ref) -> None:
    """With tied embeddings, merging a LoRA on lm_head (or the embeddings) would change both: refuse, say why."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    if not base.config.get_text_config().tie_word_embeddings:
        return
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        if isinstance(module, BaseTunerLayer):
            raise UserError(f"{ref.adapter}: the adapter trains the embeddings / lm_head of a model whose embeddings "
                            "are tied; merging would apply the change to both ends. Export the adapter without "
                            "--merge.")


def load_merged_checked(out: Path, dtype: str):
    """Reload the merged folder as a user would: no missing or unexpected weights, dtype kept, tying kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .models.vision import is_vision_model

    auto_class = AutoModelForImageTextToText if is_vision_model(out) else AutoModelForCausalLM  # as load_model does
    model, info = auto_class.from_pretrained(out, dtype="auto", output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise RuntimeError(f"the merged folder does not reload cleanly: {problems}")
    if model.dtype != getattr(torch, dtype):
        raise RuntimeError(f"the merged folder reloads as {model.dtype}, expected {dtype}")
    tied = bool(model.config.get_text_config().tie_word_embeddings)
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != same:
        raise RuntimeError(f"tie_word_embeddings is {tied} but lm_head and embeddings are "
                           f"{'shared' if same else 'separate'} after reload")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if not files or list(out.glob("*.bin")) or list(out.glob("*.pt")):
        raise RuntimeError(f"the merged folder must hold safetensors only, found {sorted(os.listdir(out))}")
    return model, {"weights": files, "tied_embeddings": tied, "reloads_clean": True}


def compare_adapter_reload(ref, out: Path) -> dict:
    """The exported adapter on the base gives exactly the stage's logits, and differs from the bare base."""
    from .models import load_model

    model = load_model(ref.base_model, adapter=ref.adapter, adapter_name="stage", dtype="float32",
                       trust_remote_code=ref.trust_remote_code)
    model.load_adapter(str(out), adapter_name="exported")
    probe = probe_batch(ref.tokenizer)
    model.set_adapter("stage")
    stage = _logits(model, probe)
    model.set_adapter("exported")
    exported = _logits(model, probe)
    with model.disable_adapter():
        base = _logits(model, probe)
    mask = probe["attention_mask"]
    error = relative_error(exported, stage, mask)
    if error != 0.0:
        raise RuntimeError(f"the exported adapter does not reproduce the stage's logits (relative error {error:.2e})")
    return {"logits_equal_to_stage": True, "logits_change_vs_base": relative_error(exported, base, mask)}


def save_tokenizer(path: str, out: Path):
    """The stage's tokenizer (or processor, for vision stages) with the recipe's chat template, saved to `out`;
    returns it."""
    from transformers import AutoTokenizer

    from .models.vision import has_processor_files, load_processor

    folder = Path(path)
    # a processor that also handles video loads image-only without torchvision, as training loaded it
    tokenizer = load_processor(folder) if has_processor_files(folder) else AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(out)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------- probing
def probe_batch(tokenizer_path: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "The answer is"
             for chat in PROBE_CHATS]
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def _logits(model, probe: dict):
    import torch

    with torch.no_grad():
        return model(**{k: v.to(model.device) for k, v in probe.items()}).logits.float().cpu()


def relative_error(logits, reference, mask) -> float:
    keep = mask.bool()
    diff = (logits[keep] - reference[keep]).norm()
    return float(diff / reference[keep].norm().clamp_min(1e-12))
