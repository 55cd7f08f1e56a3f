"""`posttrain export` on a real tiny run: adapter and merged folders, round-trip logits, the model card, the Hub push.

The run is built once per module through the real CLI (the tiny recipe reduced to its SFT stage, so the module stays
fast whatever later stages the shared tiny recipe grows); exports run in-process through `cli.main`.
"""

import json
import os
import re
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from posttrain import cli
from posttrain.export import public_base
from posttrain.models import load_model

FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789secret"


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the shared tiny run cut back to base and SFT, as a run of that stage alone (these tests are
    about exporting one stage; some write next to it)."""
    copy = tmp_path_factory.mktemp("export-run") / "tiny-sft"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("dpo", "upo", "pairs", "pairs.inputs"))
    state = json.loads((copy / "run.json").read_text())
    state["order"] = ["base", "sft"]
    state["steps"] = {step: info for step, info in state["steps"].items() if step not in ("dpo", "upo", "data/pairs")}
    (copy / "run.json").write_text(json.dumps(state))
    return copy


def export(*args, capsys=None) -> tuple[int, str]:
    code = cli.main(["export", *map(str, args)])
    return code, (capsys.readouterr().out if capsys else "")


def base_path(run: Path) -> Path:
    return Path(json.loads((run / "sft" / "lineage.json").read_text())["base_model"]["path"])


def probe(run: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                         add_generation_prompt=True)
    return dict(tokenizer([text + "7"], return_tensors="pt", add_special_tokens=False))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def greedy_reply(model, tokenizer_dir: Path) -> str:
    """The reply the card's usage code should print: the same question, greedy, asked directly of `model`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_snippet(readme: Path, replacements: dict[str, str]) -> str:
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    for old, new in replacements.items():
        code = code.replace(old, new)
    printed = StringIO()
    with redirect_stdout(printed):
        exec(compile(code, str(readme), "exec"), {})
    return printed.getvalue()


# ---------------------------------------------------------------------------------------------------------- adapter
def test_adapter_export_is_self_contained(run, tmp_path):
    out = tmp_path / "adapter"
    assert export(run, "--out", out)[0] == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "README.md",
            "export.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names), "safetensors only"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny:llama", "the recipe's base name, not our cache path"
    exported, trained = load_file(out / "adapter_model.safetensors"), load_file(run / "sft" / "adapter_model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert any(t.count_nonzero() > 0 for k, t in exported.items() if "lora_B" in k)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["stage"] == "sft" and manifest["verification"]["logits_equal_to_stage"] is True
    assert "{% generation %}" in (out / "chat_template.jinja").read_text(), "the recipe's chat template travels"
    assert not list(tmp_path.glob(".*")), "no temporary folder left behind"

    printed = run_snippet(out / "README.md", {})  # the card builds the tiny base as the run did
    stage = load_model(base_path(run), adapter=run / "sft")
    assert printed == greedy_reply(stage, run / "sft") + "\n", "the card's code answers as the trained stage does"


def test_adapter_export_skips_ref_and_names_hub_base(run, tmp_path):
    """A later stage keeps TRL's frozen reference adapter in ref/: only the trained one is exported. A Hub-id base
    becomes the adapter's base_model_name_or_path and the card's base_model."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "sft" / "ref").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(copy / "sft" / name, copy / "sft" / "ref" / name)
    lineage = json.loads((copy / "sft" / "lineage.json").read_text())
    lineage["base_model"]["name"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (copy / "sft" / "lineage.json").write_text(json.dumps(lineage))

    assert export(copy, "--out", tmp_path / "out", "--license", "apache-2.0")[0] == 0
    assert not (tmp_path / "out" / "ref").exists()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and metadata["library_name"] == "peft"
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"' in card


def test_an_adapter_names_the_hub_snapshot_it_was_trained_on(run, tmp_path, capsys):
    """`main` moves on: the adapter's config (PEFT's AutoPeftModel loads the base at its `revision`) and the card's
    code name the Hub commit the stage trained on, also when the recipe named the snapshot folder itself (it named a
    cache path). A snapshot cleared since is named with the command that puts it back, before any traceback."""
    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abc"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(base_path(run).resolve())
    lineage = json.loads((copy / "sft" / "lineage.json").read_text())
    lineage["base_model"].update(name=str(snapshot), path=str(snapshot))
    (copy / "sft" / "lineage.json").write_text(json.dumps(lineage))
    assert export(copy, "--out", tmp_path / "out", "--license", "apache-2.0")[0] == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/name", "0123abc")
    assert 'from_pretrained("org/name", revision="0123abc"' in (tmp_path / "out" / "README.md").read_text()
    lineage["base_model"]["name"] = "org/name"  # named by its Hub id
    (copy / "sft" / "lineage.json").write_text(json.dumps(lineage))
    assert public_base(copy, "sft") == ("org/name", "0123abc")
    resolved = copy / "sft" / "resolved.yaml"
    gone = tmp_path / "hub" / "models--o--n" / "snapshots" / "fedcba9"
    resolved.write_text(yaml.safe_dump({**yaml.safe_load(resolved.read_text()), "model_name_or_path": str(gone)}))
    capsys.readouterr()
    assert export(copy, "--out", tmp_path / "gone")[0] != 0
    assert "hf download o/n --revision fedcba9 puts that snapshot back" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------------------- merged
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_round_trip_gives_adapter_logits(run, tmp_path, dtype):
    out = tmp_path / "merged"
    assert export(run, "--merge", "--dtype", dtype, "--out", out)[0] == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()

    batch = probe(run)
    reference = logits(load_model(base_path(run), adapter=run / "sft"), batch)
    merged = load_model(out, dtype="auto")
    assert merged.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    error = float((logits(merged, batch) - reference).norm() / reference.norm())
    assert error < {"fp32": 1e-5, "bf16": 0.05}[dtype], error
    base_only = logits(load_model(base_path(run)), batch)
    assert float((base_only - reference).norm() / reference.norm()) > 10 * error, "the probe sees the adapter"

    # tied embeddings stay tied: one shared tensor in memory, no separate lm_head in the file
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys() and "model.embed_tokens.weight" in weights.keys()
    checks = json.loads((out / "export.json").read_text())["verification"]
    assert checks["tied_embeddings"] and checks["logits_relative_error"] <= checks["tolerance"]

    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert run_snippet(out / "README.md", {}) == greedy_reply(merged, out) + "\n"


def test_a_merge_without_dtype_or_out_keeps_the_bases_dtype_beside_the_adapters_export(run, tmp_path, monkeypatch):
    """Without --dtype the merged weights keep the base model's own dtype (its config.json's `dtype`, or the older
    `torch_dtype`); without --out a merged export goes to RUN/exports/<stage>-merged, beside the adapter's
    RUN/exports/<stage>."""
    from posttrain import export as export_module

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))  # written by older transformers
    assert export_module._config_dtype(str(tmp_path)) == "bfloat16"
    monkeypatch.setattr(export_module, "_config_dtype", lambda path: "bfloat16")  # a bf16 base, as most are
    copy = tmp_path / "tiny-sft"
    shutil.copytree(run, copy)
    assert export(copy, "--merge")[0] == 0
    out = copy / "exports" / "sft-merged"
    assert json.loads((out / "export.json").read_text())["verification"]["dtype"] == "bfloat16"
    assert load_model(out, dtype="auto").dtype == torch.bfloat16
    assert [p.name for p in (copy / "exports").iterdir()] == ["sft-merged"]


def test_a_merged_model_stops_where_the_template_ends_a_reply(tiny_model_path, tmp_path):
    """The ERNIE template ends a reply with <|end_of_sentence|>, which posttrain makes the tokenizer's EOS; a merged
    export's generation config (what `generate()`, pipelines and serving engines stop on) gets it too, beside the
    model's own EOS."""
    from posttrain.export import save_tokenizer, stop_at_reply_end
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path("llama"), "ernie4_5")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = load_model(tiny_model_path("llama"))
    assert model.generation_config.eos_token_id == 2 != tokenizer.eos_token_id
    exported = save_tokenizer(str(tmp_path / "tokenizer"), tmp_path / "export")  # what write_merged reads it from
    stop_at_reply_end(model, exported.eos_token_id)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, 2]
    stop_at_reply_end(model, exported.eos_token_id)  # once only
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, 2]


def test_a_merged_export_stops_where_its_tokenizer_ends_a_reply(run, tmp_path):
    """The merged folder's generation config carries the exported tokenizer's EOS (the ERNIE template's
    <|end_of_sentence|> here) beside the model's own, as `stop_at_reply_end` sets it."""
    from posttrain.export import write_merged
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(str(base_path(run)), "ernie4_5")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    ref = SimpleNamespace(base_model=str(base_path(run)), adapter=str(run / "sft"), tokenizer=str(tmp_path / "tokenizer"),
                          trust_remote_code=False)
    (tmp_path / "out").mkdir()
    write_merged(ref, tmp_path / "out", "float32")
    config = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [tokenizer.eos_token_id, 2]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: within the tolerance 16-bit weights are given
def test_failed_verification_writes_nothing(run, tmp_path, monkeypatch, dtype):
    from peft.tuners.tuners_utils import BaseTuner

    # a "merge" that drops the adapter instead of merging it: the round-trip check must catch it
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(RuntimeError, match="do not reproduce adapter-on-base"):
        export(run, "--merge", "--dtype", dtype, "--out", tmp_path / "merged")
    assert list(tmp_path.iterdir()) == [], "neither the folder nor its temporary sibling remains"


@pytest.mark.parametrize("given, meant", [("MIT", "mit"), ("Apache 2.0", "apache-2.0"), ("", "other")])
def test_a_license_the_hub_would_refuse_is_refused_before_the_export(run, tmp_path, capsys, given, meant):
    """The Hub checks the card's `license:` at the upload, after minutes of export work: a name instead of its
    identifier is refused first, with the identifier it most likely meant; an identifier passes."""
    code, said = export(run, "--license", given, "--out", tmp_path / "out", capsys=capsys)
    said = " ".join(said.split())
    assert code == 2 and f"--license {given!r}: the Hub takes a license identifier, lowercase, such as '{meant}'" in said
    assert not (tmp_path / "out").exists()
    assert export(run, "--license", "cc-by-nc-4.0", "--out", tmp_path / "out")[0] == 0
    assert "license: cc-by-nc-4.0" in (tmp_path / "out" / "README.md").read_text()


def test_a_stage_folder_without_its_tokenizer_is_named_before_the_export(run, tmp_path, capsys):
    """The export saves the stage's tokenizer beside the weights: a folder copied without it is named first (was
    transformers' ValueError traceback after the merge)."""
    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("tokenizer*"))
    code, said = export(copy, "--stage", "sft", "--merge", "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and "sft holds no tokenizer files (tokenizer_config.json, tokenizer.json" in " ".join(said.split())
    assert not (tmp_path / "out").exists()


def test_a_stage_trained_again_while_it_is_exported_writes_nothing(run, tmp_path, monkeypatch, capsys):
    """`export` takes no run lock (a finished stage may be exported while the run trains the next): a run of the same
    folder that replaces the stage meanwhile would pair one training's weights with another's card."""
    from posttrain import export as export_module

    copy = shutil.copytree(run, tmp_path / "run")
    write_adapter = export_module.write_adapter

    def trained_again(ref, out):
        checks = write_adapter(ref, out)
        lineage = copy / "sft" / "lineage.json"
        shutil.copy(lineage, lineage.with_suffix(".new"))
        lineage.with_suffix(".new").replace(lineage)  # as the run's rename of the new stage folder gives new files
        return checks

    monkeypatch.setattr(export_module, "write_adapter", trained_again)
    code, said = export(copy, "--stage", "sft", "--out", tmp_path / "out", capsys=capsys)
    said = " ".join(said.split())
    assert code == 2 and "sft was replaced while it was exported (the run trained the stage again" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "neither the folder nor its temporary sibling"


def test_a_merge_that_gives_nan_logits_writes_nothing(run, tmp_path, monkeypatch):
    """NaN weights (a 16-bit overflow, say) make the logit error NaN, which no tolerance compares as above: the
    check refuses what it cannot show to be within it."""
    from peft.tuners.tuners_utils import BaseTuner

    merge = BaseTuner.merge_and_unload

    def overflowed(self, *args, **kwargs):
        model = merge(self, *args, **kwargs)
        with torch.no_grad():
            model.get_input_embeddings().weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", overflowed)
    with pytest.raises(RuntimeError, match="do not reproduce adapter-on-base: relative logit error nan"):
        export(run, "--merge", "--out", tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_lora_on_tied_embeddings_is_refused_for_a_merge_only_where_they_are_tied(tiny_model_path):
    """Merged, a LoRA on the embeddings of a model whose lm_head shares them would change both ends; with untied
    embeddings it merges like any other layer."""
    from peft import LoraConfig, get_peft_model

    from posttrain.errors import UserError
    from posttrain.export import _refuse_lora_on_tied_embeddings

    ref = SimpleNamespace(adapter="stage-adapter")
    for tied in (True, False):
        base = load_model(tiny_model_path("llama"))
        base.config.tie_word_embeddings = tied
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
        if tied:
            with pytest.raises(UserError, match="stage-adapter: the adapter trains the embeddings / lm_head of a "
                                                "model whose embeddings are tied"):
                _refuse_lora_on_tied_embeddings(model, ref)
        else:
            _refuse_lora_on_tied_embeddings(model, ref)


def test_a_merged_folder_that_reloads_with_other_weights_or_dtype_is_refused(tiny_model_path, tmp_path):
    """The reload check names weights the folder has that the model does not take, and a dtype other than the one
    asked for; the folder as saved passes."""
    from safetensors.torch import load_file, save_file

    from posttrain.export import load_merged_checked

    model = load_model(tiny_model_path("llama"))
    model.save_pretrained(tmp_path / "fp32")
    assert load_merged_checked(tmp_path / "fp32", "float32")[1]["reloads_clean"]
    with pytest.raises(RuntimeError, match=r"reloads as torch.float32, expected bfloat16"):
        load_merged_checked(tmp_path / "fp32", "bfloat16")
    weights = tmp_path / "fp32" / "model.safetensors"
    save_file({**load_file(weights), "model.extra.weight": torch.ones(2)}, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"does not reload cleanly: \{'unexpected_keys': \['model.extra.weight'\]\}"):
        load_merged_checked(tmp_path / "fp32", "float32")
    model.save_pretrained(tmp_path / "fp32")
    torch.save({}, tmp_path / "fp32" / "pytorch_model.bin")  # a pickle beside the safetensors
    with pytest.raises(RuntimeError, match=r"must hold safetensors only, found \[.*'pytorch_model.bin'"):
        load_merged_checked(tmp_path / "fp32", "float32")


# ---------------------------------------------------------------------------------------------------------- the card
def test_card_embeds_the_runs_real_metrics_recipe_and_lineage(run, tmp_path):
    assert export(run, "--out", tmp_path / "out")[0] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "peft" and metadata["license"] == "apache-2.0"
    assert {"posttrain", "sft", "lora"} <= set(metadata["tags"]) and metadata["pipeline_tag"] == "text-generation"
    assert "base_model" not in metadata, "tiny:llama is not a Hub id, so it is not Hub metadata"

    base = json.loads((run / "base" / "metrics.json").read_text())["eval"]
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    for evaluation in (base, sft["eval"]):
        assert f"{evaluation['accuracy']:.1%}" in card and f"{evaluation['heldout_loss']:.4f}" in card
        assert f"{evaluation['stop_rate']:.1%}" in card
    assert f"| base | {base['accuracy']:.1%} |" in card and f"| sft | {sft['eval']['accuracy']:.1%} |" in card
    assert f"{sft['train']['train_loss']:.4f}" in card and f"| sft | {sft['train']['global_step']} |" in card
    lineage = json.loads((run / "sft" / "lineage.json").read_text())
    assert lineage["inputs_hash"] in card and lineage["versions"]["trl"] in card
    assert lineage["datasets"]["dataset_name"]["fingerprint"][:16] in card
    recipe = (run / "recipe.yaml").read_text()
    assert recipe.strip() in card and "used other overrides" not in card
    assert str(run.resolve()) not in card, "machine paths are shown as {run}"
    assert "peft#3711" not in card, "the MoE loading note is for adapters with LoRA on an MoE model's dense layers"


def test_card_rows_tags_and_notes_follow_what_the_run_recorded(run, tmp_path, monkeypatch):
    """Each number in its own column, the last logged step, the last step's samples, a Hub dataset as metadata and
    labelled by its role, the --license given, a merged card's tags and check, no machine paths; a base that is a
    local folder (even one named like a Hub id) is said to be one."""
    from posttrain.model_card import write_card

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "sft" / "metrics.json").read_text())
    metrics["eval"].update(accuracy=0.125, format=0.25, stop_rate=0.75)
    (copy / "sft" / "metrics.json").write_text(json.dumps(metrics))
    base = json.loads((copy / "base" / "metrics.json").read_text())
    base["eval"]["samples"] = [{"prompt": "p", "answer": "a", "completion": "a reply before training", "correct": False}]
    (copy / "base" / "metrics.json").write_text(json.dumps(base))
    lineage = json.loads((copy / "sft" / "lineage.json").read_text())
    lineage["datasets"]["upo_offline_dataset"] = {"path": "org/prefs", "fingerprint": "f" * 64}
    (copy / "sft" / "lineage.json").write_text(json.dumps(lineage))
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"kind": "merged", "base_model": "tiny:llama", "verification": {"logits_relative_error": 1e-7}}
    card = write_card(out, copy, "sft", manifest, model_id=str(out), license="mit").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "mit" and metadata["datasets"] == ["org/prefs"]
    assert metadata["library_name"] == "transformers" and "lora" not in metadata["tags"]
    ev = metrics["eval"]
    assert f"| sft | 12.5% | 25.0% | 75.0% | {ev['heldout_loss']:.4f} | {ev['n']} |" in card
    assert "| sft (offline pairs) | `org/prefs` |" in card
    assert "Sample replies after sft" in card and "a reply before training" not in card
    logged = [e for e in metrics["log_history"] if "loss" in e]
    assert json.dumps(logged[-1], indent=1, default=float) in card and logged[-1] != logged[0]
    assert "output_dir" not in card and str(base_path(run)) not in card, "machine paths stay out of the card"
    assert "carries all of them" not in card, "one stage carries only itself"
    assert "(merged weights reloaded from this folder vs the adapter on the base model" in card
    assert "used other overrides" not in card

    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    (copy / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "eval": {**recipe["eval"], "samples": 2}}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)  # a local folder named like a Hub id
    manifest = {"kind": "adapter", "base_model": "org/model", "verification": {}}
    card = write_card(out, copy, "sft", manifest, model_id=str(out)).read_text()
    assert "The base model is a local folder (`org/model`)" in card
    assert "A later run of this folder used other overrides" in card, "the recipe.yaml now is not what sft ran"
    assert "base_model" not in yaml.safe_load(card.split("---")[1])


@pytest.mark.parametrize("state", ["", '{"name": "tiny-sft"}'])  # a power loss left it empty; from before `order`
def test_a_card_is_written_from_the_stage_folders_when_run_json_says_no_order(run, tmp_path, state):
    """`stage_ref` finds the stage then (the report too): the card, written after minutes of verification, did not."""
    from posttrain.model_card import write_card

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "run.json").write_text(state)
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"kind": "adapter", "base_model": "tiny:llama", "verification": {}}
    card = write_card(out, copy, "sft", manifest, model_id=str(out)).read_text()
    steps = json.loads((run / "sft" / "metrics.json").read_text())["train"]["global_step"]
    assert "(run `run`: sft)" in card and f"| sft | {steps} |" in card


def test_a_card_of_a_moved_run_describes_its_own_data_not_the_old_folders(run, tmp_path):
    """A run folder moved (to another machine, another disk): the card reads the data cards in the run folder it was
    given, as `eval` reads its data, and names no path of the folder it ran in."""
    from posttrain.model_card import write_card

    moved = shutil.copytree(run, tmp_path / "moved")
    ran_in = Path(yaml.safe_load((moved / "sft" / "resolved.yaml").read_text())["output_dir"]).parent
    for name in ("resolved.yaml", "lineage.json"):  # as written on the machine it ran on
        path = moved / "sft" / name
        path.write_text(path.read_text().replace(str(ran_in), "/elsewhere/tiny-sft"))
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"kind": "adapter", "base_model": "tiny:llama", "verification": {}}
    card = write_card(out, moved, "sft", manifest, model_id=str(out)).read_text()
    source = json.loads((moved / "data" / "verifiable" / "card.json").read_text())["sources"][0]
    assert f"{source['name']} ({source['license']}, {source['rows_kept']})" in card
    assert "/elsewhere" not in card and "| sft | `{run}/data/verifiable` |" in card


def test_a_card_leaves_out_the_damaged_records_of_the_steps_before_the_exported_stage(run, tmp_path, capsys):
    """The base step's metrics.json emptied and the data card of SFT's data cut short (a copy of the run cut short):
    the card of sft says what it could not read and shows it unrecorded, where export ended in a JSONDecodeError
    traceback after its verification."""
    from posttrain.model_card import write_card

    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "base" / "metrics.json").write_text("")
    (copy / "data" / "verifiable" / "card.json").write_text('{"sources": [')
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"kind": "adapter", "base_model": "tiny:llama", "verification": {}}
    card = write_card(out, copy, "sft", manifest, model_id=str(out)).read_text()
    said = " ".join(capsys.readouterr().out.split())
    assert "base/metrics.json is unreadable" in said and "verifiable/card.json is unreadable" in said
    assert "| base | — |" in card and "| sft | `{run}/data/verifiable` | " in card


def test_the_card_offers_the_thinking_switch_only_where_the_template_has_one(run, tmp_path):
    """A run on the model's own template (`chat_template: null`) without enable_thinking: its card said the template
    takes it."""
    from posttrain.model_card import write_card

    manifest = {"kind": "merged", "base_model": "tiny:llama", "verification": {}}
    for template, offered in (("{{ enable_thinking }}", True), ("{{ messages }}", False)):
        out = tmp_path / str(offered)
        out.mkdir()
        (out / "chat_template.jinja").write_text(template)
        card = write_card(out, run, "sft", manifest, model_id=str(out)).read_text()
        assert ("the chat template takes enable_thinking" in card) is offered


def test_the_moe_note_is_for_dense_layers_beside_expert_parameters_on_a_model_peft_converts(tmp_path):
    """LoRA on `gate_proj`/`up_proj`/`down_proj` of a dense model (no expert parameters) loads in any PEFT; so does
    an adapter of a model PEFT does not convert (ERNIE-4.5-VL): no note for either."""
    from posttrain.model_card import _moe_note

    config = {"target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"], "target_parameters": None}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert _moe_note(tmp_path, merged=False) == ""
    config["target_parameters"] = ["mlp.experts.gate_up_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert "huggingface/peft#3715" in _moe_note(tmp_path, merged=False)
    assert _moe_note(tmp_path, merged=False, model_type="ernie4_5_vl_moe") == ""


def test_a_forced_export_says_so_in_the_card_and_export_json(run, tmp_path):
    """--force past a failed promote gate: the card a stranger reads (and export.json) says the run rejected it."""
    gated = tmp_path / "gated"
    shutil.copytree(run, gated)
    metrics = json.loads((gated / "sft" / "metrics.json").read_text())
    metrics["promotion"] = {"against": "base", "gate": {"passed": False, "reason": "accuracy 1.0% vs 9.0% after base"}}
    (gated / "sft" / "metrics.json").write_text(json.dumps(metrics))
    assert export(gated, "--force", "--out", tmp_path / "out")[0] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Exported with `--force`**: its promote gate rejected it (accuracy 1.0% vs 9.0% after base)" in card
    assert "promote gate rejected" in json.loads((tmp_path / "out" / "export.json").read_text())["forced"]
    assert export(run, "--force", "--out", tmp_path / "plain")[0] == 0  # --force on a stage that needs none
    assert "forced" not in json.loads((tmp_path / "plain" / "export.json").read_text())


# ---------------------------------------------------------------------------------------------------------- errors
def test_unfinished_or_unknown_stage_is_named(run, tmp_path, capsys):
    code, out = export(run, "--stage", "dpo", "--out", tmp_path / "x", capsys=capsys)
    assert code == 2 and "'dpo'" in out and "finished: base, sft" in out
    code, out = export(run, "--stage", "base", "--out", tmp_path / "x", capsys=capsys)
    assert code == 2 and "export a trained stage (sft)" in out
    assert not (tmp_path / "x").exists()


def test_flags_that_need_another_flag_are_refused_before_any_work(run, tmp_path, capsys):
    """--dtype describes merged weights, --private and --revision the Hub upload: alone, each is refused, saying
    which flag to add, and nothing is written."""
    code, printed = export(run, "--dtype", "bf16", "--out", tmp_path / "x", capsys=capsys)
    assert code == 2 and "--dtype applies to merged weights; add --merge" in printed
    for flags in (["--private"], ["--revision", "exp-1"]):
        code, printed = export(run, *flags, "--out", tmp_path / "x", capsys=capsys)
        assert code == 2 and "describe the Hub upload; add --push-to-hub ORG/NAME" in printed, flags
    assert not (tmp_path / "x").exists()


def test_an_adapter_whose_lora_b_is_all_zero_is_not_exported(run, tmp_path, capsys):
    """An adapter file whose every lora_B is zero (replaced after training, or never trained) changes nothing on the
    base: export refuses it, naming the file, and writes nothing."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "tiny-sft"
    shutil.copytree(run, copy)
    path = copy / "sft" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: t.zero_() if "lora_B" in k else t for k, t in tensors.items()}, path)
    code, out = export(copy, "--out", tmp_path / "x", capsys=capsys)
    assert code == 2 and "untrained (every lora_B is zero)" in out and str(path) in " ".join(out.split())
    assert not (tmp_path / "x").exists()


def test_an_adapter_with_some_lora_b_still_zero_is_exported(run, tmp_path):
    """A LoRA_B left at zero in some layers (no gradient reached them) still leaves a trained adapter: only one whose
    every lora_B is zero is refused."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "tiny-sft"
    shutil.copytree(run, copy)
    path = copy / "sft" / "adapter_model.safetensors"
    tensors = load_file(path)
    first = next(k for k in sorted(tensors) if "lora_B" in k)
    save_file({k: t.zero_() if k == first else t for k, t in tensors.items()}, path)
    assert export(copy, "--out", tmp_path / "out")[0] == 0
    assert torch.count_nonzero(load_file(tmp_path / "out" / "adapter_model.safetensors")[first]) == 0


def test_the_tiny_base_is_named_as_the_recipe_names_it_whatever_the_folder(run, tmp_path, monkeypatch):
    """`tiny:<arch>` names the model posttrain builds, never a folder: one of that name in the working folder is
    not taken for the base."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny:llama").mkdir()
    assert public_base(run, "sft") == ("tiny:llama", None)


def test_an_exported_adapter_must_give_exactly_the_stages_logits(run, tmp_path, monkeypatch):
    """The exported adapter file is the stage's own: any difference in the logits, however small, means it is not
    (here one lora_B scaled by 1.001 on its way out)."""
    from safetensors.torch import load_file, save_file

    from posttrain import export as export_module

    copy = export_module.shutil.copyfile

    def changed_on_the_way(src, dst, *args, **kwargs):
        if Path(src).name != "adapter_model.safetensors":
            return copy(src, dst, *args, **kwargs)
        tensors = load_file(src)
        first = next(k for k in sorted(tensors) if "lora_B" in k)
        save_file({**tensors, first: tensors[first] * 1.001}, dst)
        return dst

    monkeypatch.setattr(export_module.shutil, "copyfile", changed_on_the_way)
    with pytest.raises(RuntimeError, match="the exported adapter does not reproduce the stage's logits"):
        export(run, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_folder_is_refused_unless_overwrite(run, tmp_path, capsys):
    """An existing export is replaced only with --overwrite; a folder of the user's files, or the run itself, never."""
    out = tmp_path / "out"
    assert export(run, "--out", out)[0] == 0
    code, printed = export(run, "--out", out, capsys=capsys)
    assert code == 2 and "already exists" in printed and "--overwrite" in printed
    stamp = (out / "export.json").stat().st_mtime_ns
    assert export(run, "--out", out, "--overwrite")[0] == 0
    assert (out / "export.json").stat().st_mtime_ns != stamp and (out / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary or old folder left behind"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    code, printed = export(run, "--out", mine, "--overwrite", capsys=capsys)
    assert code == 2 and "not a previous export (no export.json)" in printed
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    code, printed = export(run, "--out", run, "--overwrite", capsys=capsys)
    assert code == 2 and "holds the run" in printed and (run / "run.json").is_file()
    code, printed = export(run, "--out", run.parent, "--overwrite", capsys=capsys)  # a folder above the run
    assert code == 2 and "holds the run" in printed and (run / "run.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(run, "--out", empty, "--overwrite")[0] == 0, "an empty folder holds nothing to lose"
    assert (empty / "export.json").is_file()


def test_an_export_inside_the_runs_own_folders_is_refused(run, tmp_path, capsys):
    """A stage's folder, its `.partial` or the data are replaced when the run trains or builds them again: an export
    there would go with them, unsaid. RUN/exports/ is the place inside the run."""
    for inside in (run / "sft" / "merged", run / ".sft.partial", run / "data" / "mine"):
        code, printed = export(run, "--out", inside, capsys=capsys)
        assert code == 2 and "inside the run's own folders" in printed and not inside.exists()
    assert export(run, "--out", run / "exports" / "mine")[0] == 0


def test_overwriting_an_export_through_a_link_keeps_the_link(run, tmp_path):
    """`--out LINK --overwrite`, LINK pointing at an earlier export on a bigger disk: the export is replaced there
    and the link stays a link, with nothing left beside it."""
    target, link = tmp_path / "bigdisk" / "export", tmp_path / "link"
    assert export(run, "--out", target)[0] == 0
    link.symlink_to(target)
    stamp = (target / "export.json").stat().st_mtime_ns
    assert export(run, "--out", link, "--overwrite")[0] == 0
    assert link.is_symlink() and (target / "export.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigdisk", "link"]
    assert [p.name for p in target.parent.iterdir()] == ["export"]


# ---------------------------------------------------------------------------------------------------------- the Hub
def test_push_assembles_the_upload_without_showing_the_token(run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: calls.append(("repo_info", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw)))

    def upload_folder(self, **kw):
        calls.append(("upload_folder", kw["repo_id"], kw))
        assert self.token == FAKE_TOKEN
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    out = tmp_path / "out"
    code, printed = export(run, "--out", out, "--push-to-hub", "me/tiny-sft", "--private", "--revision", "exp-1",
                           capsys=capsys)
    assert code == 0, printed
    assert [c[0] for c in calls] == ["repo_info", "create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["timeout"] > 0, "one request with a time limit first: the Hub's own requests have none"
    assert calls[1][1] == "me/tiny-sft" and calls[1][2]["private"] is True and calls[1][2]["exist_ok"] is True
    assert calls[2][2]["branch"] == "exp-1"
    upload = calls[3][2]
    assert upload["revision"] == "exp-1" and Path(upload["folder_path"]) == out
    # a merged export pushed there before: its weights and config go in the same commit (the adapter's are uploaded)
    assert {"*.safetensors", "config.json", "adapter_config.json"} <= set(upload["delete_patterns"])
    assert "https://huggingface.co/me/tiny-sft/commit/abc" in printed
    # the card loads the branch it was pushed to, not main
    assert 'PeftModel.from_pretrained(base, "me/tiny-sft", revision="exp-1")' in (out / "README.md").read_text()
    assert FAKE_TOKEN not in printed + capsys.readouterr().err
    assert not any(FAKE_TOKEN in p.read_bytes().decode(errors="ignore") for p in out.iterdir())


def test_a_failed_upload_says_how_to_upload_to_the_branch_the_card_loads(run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    for name in ("repo_info", "create_repo", "create_branch"):
        monkeypatch.setattr(HfApi, name, lambda self, repo_id, **kw: None)

    def upload_folder(self, **kw):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    out = tmp_path / "my export"
    code, printed = export(run, "--out", out, "--push-to-hub", "me/tiny-sft", "--revision", "exp-1", capsys=capsys)
    assert code == 2 and 'revision="exp-1"' in (out / "README.md").read_text()
    assert f"upload it later with: hf upload me/tiny-sft '{out}' --revision exp-1" in " ".join(printed.split())


def test_push_without_token_fails_before_exporting(run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, printed = export(run, "--out", tmp_path / "out", "--push-to-hub", "me/tiny-sft", capsys=capsys)
    assert code == 2 and "no Hugging Face token" in printed and "HF_TOKEN" in printed
    assert not (tmp_path / "out").exists()


def test_a_hub_that_refuses_the_repository_fails_before_exporting(run, tmp_path, monkeypatch, capsys):
    """No network, or a token without write access: the repository is created (or opened) before the export, so the
    error comes first and no folder is written; the token never appears in it."""
    from huggingface_hub import HfApi

    def create_repo(self, repo_id, **kw):
        raise ConnectionError(f"could not connect to huggingface.co (authorization: Bearer {FAKE_TOKEN})")

    def missing(self, repo_id, **kw):
        raise LookupError(f"{repo_id} not found")  # the Hub answered: create_repo says the rest

    monkeypatch.setattr(HfApi, "repo_info", missing)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pytest.fail("nothing to upload"))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    code, printed = export(run, "--out", tmp_path / "out", "--push-to-hub", "me/tiny-sft", capsys=capsys)
    assert code == 2 and "could not create or open the repository" in printed and "nothing was exported" in printed
    assert "could not connect" in printed and FAKE_TOKEN not in printed + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_hub_that_never_answers_fails_in_seconds_before_exporting(run, tmp_path, monkeypatch, capsys):
    """huggingface_hub's requests wait without a limit: a proxy that accepts the connection and never answers hung
    the push; one bounded request goes first."""
    from huggingface_hub import HfApi

    from posttrain.models.load import http_timeouts

    def stalled(self, repo_id, **kw):
        assert kw.get("timeout"), "unbounded"
        raise http_timeouts()[0]("read timed out")

    monkeypatch.setattr(HfApi, "repo_info", stalled)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: pytest.fail("not after a stalled Hub"))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    code, printed = export(run, "--out", tmp_path / "out", "--push-to-hub", "me/tiny-sft", capsys=capsys)
    assert code == 2 and "did not answer within" in printed and "nothing was exported" in printed
    assert not (tmp_path / "out").exists()


def test_a_repository_id_without_its_owner_or_a_failed_token_exchange_is_named(monkeypatch):
    """`--push-to-hub name` is refused for its missing owner; a token exchange that fails (HF_OIDC_RESOURCE) is
    named by its kind only: its message may carry the token."""
    import huggingface_hub

    from posttrain.errors import UserError
    from posttrain.hub import hub_token

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UserError, match="--push-to-hub tiny-sft: give the full id, e.g. your-name/tiny-sft"):
        hub_token("tiny-sft")

    def exchange():
        raise RuntimeError(f"token exchange refused for {FAKE_TOKEN}")

    monkeypatch.setattr(huggingface_hub, "get_token", exchange)
    with pytest.raises(UserError, match="could not get a Hugging Face token: RuntimeError") as error:
        hub_token("me/tiny-sft")
    assert FAKE_TOKEN not in str(error.value)


def test_a_vision_processor_is_exported_without_torchvision(tiny_model_path, tmp_path, monkeypatch):
    """Qwen2-VL's processor also handles video, which needs torchvision: the export saves it image-only, as training
    loaded it (it was an OSError)."""
    import transformers.utils

    from posttrain.export import save_tokenizer

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    save_tokenizer(str(tiny_model_path("qwen2_vl")), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert {"processor_config.json", "preprocessor_config.json"} & {p.name for p in (tmp_path / "out").iterdir()}


def test_push_offline_fails_fast_before_exporting(run, tmp_path, posttrain_cli):
    result = posttrain_cli("export", run, "--out", tmp_path / "out", "--push-to-hub", "me/tiny-sft", cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}, check=False, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert "hf upload" not in result.stdout, "an uploaded local export's card would load a local folder"
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])  # a full disk, a spent quota
def test_a_full_disk_during_export_is_one_paragraph(run, tmp_path, monkeypatch, capsys, code):
    import errno

    from posttrain import export as export_module

    def full(ref, tmp):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(tmp / "adapter_model.safetensors"))

    monkeypatch.setattr(export_module, "write_adapter", full)
    code, printed = export(run, "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and "no space left on" in printed and "needed for the export" in printed
    assert "checkpoint" not in printed and not (tmp_path / "out").exists()


def test_an_interrupted_export_says_to_start_over_not_to_resume(run, tmp_path, monkeypatch, capsys):
    from posttrain import export as export_module

    def interrupted(ref, tmp):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_adapter", interrupted)
    code, printed = export(run, "--out", tmp_path / "out", capsys=capsys)
    assert code == 130 and "start over" in printed and "checkpoint" not in printed
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_stage_folder_without_a_safetensors_adapter_is_named_for_what_it_holds(tmp_path):
    """A pickled adapter (adapter_model.bin) is refused as such, not as no adapter; a folder of a stage that trained
    all weights says it already is a standalone model; an adapter without its adapter_config.json is no adapter."""
    from posttrain.errors import UserError
    from posttrain.export import _check_adapter_folder

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"holds a pickled adapter \(adapter_model.bin\); posttrain exports safetensors"):
        _check_adapter_folder(SimpleNamespace(adapter=str(tmp_path)))
    for name in ("adapter_config.json", "adapter_model.bin"):
        (tmp_path / name).unlink()
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds no LoRA adapter .*use_peft: false\), so the folder already is a "
                                        r"standalone model"):
        _check_adapter_folder(SimpleNamespace(adapter=str(tmp_path)))
    (tmp_path / "model.safetensors").rename(tmp_path / "adapter_model.safetensors")  # its adapter_config.json lost
    with pytest.raises(UserError, match=r"holds no LoRA adapter \(adapter_model.safetensors \+ adapter_config.json\)$"):
        _check_adapter_folder(SimpleNamespace(adapter=str(tmp_path)))
