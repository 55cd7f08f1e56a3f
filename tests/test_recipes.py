"""Every shipped recipe loads and validates; mistakes are reported with the file, the stage and the key."""

import json
from pathlib import Path

import pytest
import yaml

from posttrain.errors import UserError
from posttrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages, "a recipe runs at least one stage"
    for stage, args in recipe.stages.items():
        assert args.get("dataset_name"), f"{path}: stage {stage} has no dataset"


def test_accelerate_configs_parse():
    configs = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"single_gpu", "ddp", "fsdp", "zero2", "zero3"}
    for path in configs:
        assert "distributed_type" in yaml.safe_load(path.read_text())


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


TINY = (ROOT / "recipes" / "tiny" / "text.yaml").read_text()


def test_typo_in_stage_key_is_named(tmp_path):
    path = _write(tmp_path, TINY.replace("learning_rate:", "learning_rte:"))
    with pytest.raises(UserError, match=r"recipe.yaml: stages.sft.learning_rte: unknown key .*learning_rate"):
        load_recipe(path)


def test_wrong_type_is_named(tmp_path):
    path = _write(tmp_path, TINY.replace("max_steps: 3", "max_steps: three"))
    with pytest.raises(UserError, match=r"stages.sft.max_steps: 'three' \(str\) is not a valid int"):
        load_recipe(path)
    with pytest.raises(UserError, match=r"stages.sft.max_steps: True \(bool\) is not a valid int"):
        load_recipe(path, ["stages.sft.max_steps=true"])  # YAML's `yes`/`true` is no count
    path = _write(tmp_path, TINY.replace("  batch_size: 8\n", "  batch_size: 8\n  dtype: float16\n", 1))
    with pytest.raises(UserError, match=r"eval.dtype: 'float16'; expected one of: auto, float32, bfloat16"):
        load_recipe(path)


PROBES = [True, 0, 3, 2.5, "3e-4", "steps", "STEPS", "cosine", "x", None, [], [1], ["a"], ["underflow_overflow"],
          {"a": 1}]


@pytest.mark.parametrize("stage", ["sft", "dpo", "upo"])
def test_the_cached_key_table_judges_values_like_the_classes(stage):
    """The table kept on disk has every key of the stage's classes, and each annotation, written as JSON and read
    back, accepts and refuses the same values as the real one (enums, literals, unions, lists, exotic classes)."""
    from posttrain import recipe_fields
    from posttrain.recipe_fields import stage_dataclasses, stage_fields
    from posttrain.typecheck import _type_ok, annotation_from_json, annotation_to_json, field_types

    real = field_types(stage_dataclasses(stage))
    stage_fields(stage)  # writes the table when it is not there yet
    with pytest.MonkeyPatch.context() as patch:  # read from the cache, not the classes
        patch.setattr(recipe_fields, "stage_dataclasses", lambda stage: pytest.fail("the classes were read"))
        cached, settled = stage_fields(stage)
    assert settled and cached.keys() == real.keys()
    for name, annotation in real.items():
        again = annotation_from_json(annotation_to_json(annotation))
        for value in PROBES:
            assert _type_ok(value, cached[name]) is _type_ok(value, annotation) is _type_ok(value, again), (name, value)


def test_a_recipe_is_checked_without_importing_trl(tmp_path, monkeypatch):
    """With the key tables in the cache folder, loading a recipe imports neither TRL nor torch (seconds each)."""
    import os
    import subprocess
    import sys

    recipe = ROOT / "recipes" / "text" / "smollm2-135m.yaml"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    load_recipe(recipe)  # here (TRL is imported already): builds the tables from the classes
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "stage-fields").iterdir()) == ["dpo", "sft", "upo"]
    check = ("import sys; from posttrain.recipe import load_recipe\ntry:\n    load_recipe(sys.argv[1], sys.argv[2:])\n"
             "except Exception as exc:\n    print(exc)\n"
             "print(sorted(m for m in ('trl', 'torch', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", check, str(recipe)], capture_output=True, text=True, env=os.environ,
                         check=True)
    assert run.stdout.strip() == "[]"
    # a misspelt key is refused from the table too (it imported TRL to be sure: seconds before the error)
    run = subprocess.run([sys.executable, "-c", check, str(recipe), "stages.sft.lerning_rate=1"], capture_output=True,
                         text=True, env=os.environ, check=True)
    assert run.stdout.splitlines()[-2:] == [f"{recipe}: stages.sft.lerning_rate: unknown key for stage 'sft' (did "
                                            "you mean learning_rate?)", "[]"], run.stdout


def test_a_key_table_is_kept_per_state_of_the_files_that_define_the_keys(tmp_path, monkeypatch):
    """The table is made again when TRL's or transformers' config files change (another install of the same
    version); one whose files could not be found (an editable install) is not trusted to refuse a key: the classes
    decide, and the table is written again."""

    from posttrain import recipe_fields
    from posttrain.recipe_fields import stage_fields

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    tables = tmp_path / "cache" / "stage-fields"
    stage_fields("sft")
    stamps = recipe_fields.field_sources()
    stamps[1][2] += 1  # sft_config.py modified
    monkeypatch.setattr(recipe_fields, "field_sources", lambda: stamps)
    assert stage_fields("sft")[1] and len(list(tables.glob("sft-*.json"))) == 2
    before = set(tables.glob("sft-*.json"))
    monkeypatch.setattr(recipe_fields, "field_sources", lambda: None)
    stage_fields("sft")
    (table,) = set(tables.glob("sft-*.json")) - before
    stale = json.loads(table.read_text())
    del stale["learning_rate"]
    table.write_text(json.dumps(stale))
    fields, settled = stage_fields("sft")
    assert "learning_rate" not in fields and not settled
    assert load_recipe(ROOT / "recipes" / "tiny" / "text.yaml").stages["sft"]["learning_rate"] > 0
    assert "learning_rate" in json.loads(table.read_text())


def test_a_key_table_is_made_again_from_an_unreadable_cache_or_kept_in_none(tmp_path, monkeypatch):
    """A table naming a type it does not know (another posttrain's) is made again from the classes; a cache folder that
    cannot be written leaves the classes to decide every time; an upstream file that is not where the package's
    metadata puts it gives no stamps (the table is not trusted to refuse a key)."""
    from posttrain import recipe_fields
    from posttrain.recipe_fields import stage_fields

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    stage_fields("sft")
    (table,) = (tmp_path / "cache" / "stage-fields").glob("sft-*.json")
    for spec in ('"complex"', "5"):  # a type it does not know; a spec that is no type at all (edited by hand)
        table.write_text(f'{{"learning_rate": {spec}}}')
        fields, settled = stage_fields("sft")
        assert settled and "lora_r" in fields
        assert json.loads(table.read_text())["learning_rate"] != json.loads(spec), "the table was made again"
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "not_a_folder"))
    fields, settled = stage_fields("sft")
    assert settled and "lora_r" in fields
    monkeypatch.setitem(recipe_fields.FIELD_SOURCES, "trl", ("trl/trainer/no_such_config.py",))
    assert recipe_fields.field_sources() is None


def test_unknown_stage_and_top_level_key(tmp_path):
    with pytest.raises(UserError, match="'ppo' is not a stage"):
        load_recipe(_write(tmp_path, TINY.replace("  sft:\n", "  ppo:\n")))
    with pytest.raises(UserError, match=r"unknown top-level key\(s\) \['stagez'\]"):
        load_recipe(_write(tmp_path, TINY.replace("stages:", "stagez:")))


def test_shared_key_checked_against_each_stage(tmp_path):
    path = _write(tmp_path, TINY.replace("shared:\n", "shared:\n  beta: 0.1\n"))
    with pytest.raises(UserError, match="shared.beta: unknown key for stage 'sft'"):
        load_recipe(path)


def test_reserved_key_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="stages.sft.output_dir: set by the pipeline"):
        load_recipe(_write(tmp_path, TINY.replace("    max_steps: 3", "    max_steps: 3\n    output_dir: x")))
    with pytest.raises(UserError, match="accelerate_config: file not found"):
        load_recipe(_write(tmp_path, TINY + "accelerate_config: nowhere.yaml\n"))
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_data_job_arguments_validated(tmp_path):
    with pytest.raises(UserError, match="data.verifiable.n_trian: unknown argument of job 'build_verifiable_tasks'"):
        load_recipe(_write(tmp_path, TINY.replace("n_train:", "n_trian:")))
    with pytest.raises(UserError, match="'build_nothing' is not a data_prep job"):
        load_recipe(_write(tmp_path, TINY.replace("job: build_verifiable_tasks", "job: build_nothing")))


def test_a_data_job_value_the_job_refuses_is_a_recipe_error(tmp_path):
    """A value a job's config refuses (`test_size: -1`) failed when that job ran, after the jobs before it, and a count
    it could not use (`n_train: 0`) wrote no rows: the recipe's check refuses both, as the job does."""
    from data_prep.build_verifiable_tasks import main
    from data_prep.jobs import check_data_section

    with pytest.raises(UserError, match=r"r.yaml: data.mix: test_size must be >= 0, got -1"):
        check_data_section({"mix": {"job": "build_sft_set", "sources": ["x.jsonl"], "test_size": -1}}, "r.yaml", [])
    with pytest.raises(UserError, match=r"r.yaml: data.pairs.num_samples: 0 is below the minimum of 1"):
        check_data_section({"pairs": {"job": "build_onpolicy_pairs", "num_samples": 0}}, "r.yaml", [])
    with pytest.raises(UserError, match=r"--n_train: 0 is below the minimum of 1"):  # the job itself, the same way
        main(["--n_train", "0", "--output_dir", str(tmp_path / "out")])


def test_a_data_section_is_checked_once_per_process_and_a_mistake_every_time(tmp_path, monkeypatch):
    """The check runs in a child process (data_prep is not imported here): a section that passed is not checked again,
    while a wrong one is refused on every load."""
    from posttrain import datajobs

    asked = []
    real_ask = datajobs._ask
    monkeypatch.setattr(datajobs, "_ask", lambda *args, **kwargs: asked.append(args) or real_ask(*args, **kwargs))
    datajobs._check.cache_clear()
    good = _write(tmp_path, TINY)
    assert load_recipe(good).data == load_recipe(good).data
    assert asked == [("check",)]
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("n_train:", "n_trian:"))
    for _ in range(2):
        with pytest.raises(UserError, match="n_trian: unknown argument"):
            load_recipe(bad)
    assert asked == [("check",)] * 3


def test_overrides(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml",
                         ["stages.sft.learning_rate=1e-4", "shared.lora_r=4", "name=other"])
    assert recipe.name == "other"
    assert recipe.stages["sft"]["learning_rate"] == 1e-4
    assert recipe.stages["sft"]["lora_r"] == 4
    with pytest.raises(UserError, match="should look like section.key=value"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.sft.learning_rate"])


def test_onpolicy_rewards_mapping_and_old_lists(tmp_path):
    """`build_onpolicy_pairs` takes rewards as UPO does, {name: weight}; the old parallel lists still load (recipe and
    job), with a warning that gives the new spelling."""
    from data_prep.build_onpolicy_pairs import OnPolicyPairsConfig, make_parser
    from data_prep.config import parse_config

    text = (ROOT / "recipes" / "tiny" / "text.yaml").read_text()
    assert "rewards: {length_penalty: 1.0}" in text
    old = text.replace("rewards: {length_penalty: 1.0}", "rewards: [length_penalty, accuracy]\n    reward_weights: [1.0, 2.0]")
    assert load_recipe(_write(tmp_path, old)).data["pairs"]["reward_weights"] == [1.0, 2.0]

    assert OnPolicyPairsConfig(rewards={"accuracy": 2}).rewards == {"accuracy": 2.0}
    flags = ["--rewards", "accuracy=1", "length_penalty=0.1", "--output_dir", str(tmp_path)]
    assert parse_config(OnPolicyPairsConfig, make_parser(), flags, needs_sources=False).rewards == {
        "accuracy": 1.0, "length_penalty": 0.1}
    with pytest.warns(FutureWarning, match=r"write the same as one mapping, `rewards: \{length_penalty: 1.0, accuracy: 2.0\}"):
        config = OnPolicyPairsConfig(rewards=["length_penalty", "accuracy"], reward_weights=[1.0, 2.0])
    assert config.rewards == {"length_penalty": 1.0, "accuracy": 2.0} and config.reward_weights is None
    with pytest.raises(UserError, match="2 weights for 1 rewards"):
        OnPolicyPairsConfig(rewards=["accuracy"], reward_weights=[1.0, 2.0])
    with pytest.raises(UserError, match="inside `rewards`"):
        OnPolicyPairsConfig(rewards={"accuracy": 1.0}, reward_weights=[1.0])


def test_llamafactory_registry_as_a_data_job_source(tmp_path):
    """A user migrating from LLaMA-Factory names their dataset_info.json and a dataset in it."""

    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    recipe = yaml.safe_load(TINY)
    registry = "tests/assets/data/llamafactory/dataset_info.json"  # relative: found from the repository
    recipe["data"] = {"prefs": {"job": "build_preference_set", "test_size": 0,
                                "sources": [{"dataset_info": registry, "name": "dpo_demo"}]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    pipeline = Pipeline(load_recipe(str(path)), tmp_path / "outputs")
    pipeline.build_data(after=None)
    card = json.loads((pipeline.data_path("prefs") / "card.json").read_text())
    assert card["kind"] == "preference" and card["sources"][0]["format"] == "sharegpt_preference"
    assert card["sources"][0]["rows_read"] == 3 and card["sources"][0]["name"] == "dpo_demo"


def test_live_tracking_names_each_stage_by_run_and_stage(tmp_path, monkeypatch):
    """report_to: trackio / tensorboard in every stage: the run (or the ablation) is the project, each stage a run in
    it, TensorBoard files per stage under the run; the names never change a stage's inputs hash."""
    from posttrain.pipeline import Pipeline

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["shared.report_to=[trackio,tensorboard]"])
    pipeline, variant = Pipeline(recipe, tmp_path), Pipeline(recipe, tmp_path, project="tiny-text-ablation")
    pipeline.base_hash = variant.base_hash = "base"  # set when the base model is resolved
    for stage in recipe.stages:
        args = pipeline.stage_args(stage, None)
        assert (args["project"], args["report_to"]) == ("tiny-text", ["trackio", "tensorboard"])
        assert pipeline.tracking_run(stage, "0123456789abcdef") == f"{stage}-01234567"
        assert pipeline.tracking_env(stage, "0123456789abcdef") == {
            "TENSORBOARD_LOGGING_DIR": str(pipeline.root / "tensorboard" / f"{stage}-01234567")}
        assert variant.stage_args(stage, None)["project"] == "tiny-text-ablation"
        assert pipeline.stage_hashes(stage, args, None) == variant.stage_hashes(stage, variant.stage_args(stage, None),
                                                                                 None)


@pytest.mark.parametrize("name", ["smollm2-135m.yaml", "smollm2-135m-ablation.yaml"])
def test_shipped_held_out_sets_can_show_a_ten_point_change(name):
    """With 200 prompts a 10-point accuracy change is about 2.8 standard errors of one accuracy; with 48, 1.4."""
    from data_prep.build_verifiable_tasks import VerifiableTasksConfig, generate

    recipe = load_recipe(ROOT / "recipes" / "text" / name)
    spec = {k: v for k, v in recipe.data["verifiable"].items() if k in ("n_train", "n_test", "seed")}
    assert len(generate(VerifiableTasksConfig(**spec))["test"]) >= 200
    assert recipe.gates["upo"].metric == "accuracy"


def test_a_template_file_beside_the_recipe_is_found_from_any_folder(tmp_path, monkeypatch):
    """`chat_template: mine.jinja` next to the recipe: the run loads that file (as `--dry-run` checks it), whatever the
    current folder."""
    import re

    from posttrain.models.templates import chat_template_text

    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    (recipe.parent / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    recipe.write_text(re.sub(r"chat_template: \S+", "chat_template: mine.jinja", TINY))
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe)
    assert Path(loaded.base.chat_template) == recipe.parent / "mine.jinja"
    assert chat_template_text(loaded.base.chat_template) == "{{ messages[0]['content'] }}"
    (tmp_path / "mine.jinja").write_text("{{ 'here' }}")  # a path as given, from the working folder, comes first
    assert Path(load_recipe(recipe).base.chat_template) == tmp_path / "mine.jinja"


def test_a_dataset_file_beside_the_recipe_is_found_from_any_folder(tmp_path, monkeypatch):
    """`dataset_name: data/chat.jsonl` relative to the recipe's folder, run from another folder (README: relative paths
    are found from the working directory, the recipe's folder or the repository); one found from here stays as
    written."""
    import re

    recipe = tmp_path / "recipes" / "r.yaml"
    (recipe.parent / "data").mkdir(parents=True)
    (recipe.parent / "data" / "chat.jsonl").write_text("{}\n")
    recipe.write_text(re.sub(r"(sft:\n(?:.*\n)*?\s+dataset_name:) \S+", r"\1 data/chat.jsonl", TINY, count=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_recipe(recipe).stages["sft"]["dataset_name"] == str(recipe.parent / "data" / "chat.jsonl")
    monkeypatch.chdir(recipe.parent)
    assert load_recipe(recipe).stages["sft"]["dataset_name"] == "data/chat.jsonl"


def test_a_data_job_source_beside_the_recipe_is_found_from_any_folder(tmp_path, monkeypatch):
    """A data job's source file is read relative to the recipe's folder too (as `dataset_name` is): run from another
    folder, it is there; one that is nowhere is named with its key."""
    from posttrain.recipe_files import check_recipe_files

    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    (recipe.parent / "chat.jsonl").write_text('{"messages": []}\n')
    job = "data:\n  mix:\n    job: build_sft_set\n    sources: [{path: chat.jsonl}]\n"
    recipe.write_text(TINY.replace("data:\n", job, 1))
    monkeypatch.chdir(tmp_path)
    check_recipe_files(load_recipe(recipe))
    recipe.write_text(TINY.replace("data:\n", job.replace("chat.jsonl", "chats.jsonl"), 1))
    with pytest.raises(UserError, match=r"data.mix.sources\[0\].path: file not found: chats.jsonl"):
        check_recipe_files(load_recipe(recipe))


def test_a_split_a_local_folder_lacks_is_named_before_any_work(tmp_path):
    """`eval.split: tset` on a folder of parquet splits failed at the base evaluation, after the data jobs; a data
    file is one split under any name; a `save_to_disk` folder's splits are its dataset_dict.json's."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data import folder_splits
    from posttrain.recipe_files import check_recipe_files

    (tmp_path / "held_out").mkdir()
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "held_out" / "test.parquet")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "held_out.parquet")
    recipe = load_recipe(_write(tmp_path, TINY))

    def evaluating(dataset, split):
        return dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, dataset=str(dataset), split=split))

    with pytest.raises(UserError, match=r"eval.split: 'tset' is not a split of .*held_out \(it has: test\)"):
        check_recipe_files(evaluating(tmp_path / "held_out", "tset"))
    check_recipe_files(evaluating(tmp_path / "held_out", "test"))
    check_recipe_files(evaluating(tmp_path / "held_out.parquet", "tset"))
    unread = {**recipe.stages["sft"], "dataset_test_split": "nope"}  # SFT reads it only with an eval_strategy
    check_recipe_files(dataclasses.replace(recipe, stages={**recipe.stages, "sft": unread}))
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    assert folder_splits(tmp_path / "saved") == ["train", "validation"]
    (tmp_path / "empty").mkdir()  # no data set at all: its loading names what is missing, not "it has: "
    assert folder_splits(tmp_path / "empty") is None
    from data_prep import build_verifiable_tasks as job  # its SPLITS, which the check reads, are what it writes

    assert list(job.to_tables(job.generate(job.VerifiableTasksConfig(n_train=5, n_test=5)))) == list(job.SPLITS)


def test_dpos_test_split_is_checked_without_an_eval_strategy():
    """DPO reads its `dataset_test_split` for the held-out preference accuracy whatever its eval_strategy (SFT and
    UPO only with one): a split its data job does not write is named before any work."""
    from posttrain.recipe_files import check_recipe_files

    with pytest.raises(UserError, match=r"stages.dpo.dataset_test_split: 'tset' is not a split of \{data\}/pairs "
                                        r"\(its job build_onpolicy_pairs writes: train, test\)"):
        check_recipe_files(load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.dpo.dataset_test_split=tset"]))


def test_a_missing_relative_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`./held_out` has one slash like `org/name`, but it names a local folder: missing, it is named as one, not
    looked up on the Hub (online, it would pass unchecked)."""
    from posttrain.models import load
    from posttrain.recipe_files import check_recipe_files

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load, "datasets_offline", lambda: False)
    with pytest.raises(UserError, match=r"eval.dataset: no such folder or data file: ./held_out"):
        check_recipe_files(load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["eval.dataset=./held_out"]))


def test_upo_offline_pairs_and_phase_splits_are_checked_before_any_work(tmp_path):
    """UPO reads its offline pairs' `train` split and each phase's own prompt split only when the stage starts, after
    every stage before it: a folder without them is named by the recipe check."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.recipe_files import check_recipe_files

    (tmp_path / "pairs").mkdir()
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "pairs" / "test.parquet")
    (tmp_path / "logic").mkdir()
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "logic" / "train.parquet")
    recipe = load_recipe(_write(tmp_path, TINY))

    def upo(**args):
        return dataclasses.replace(recipe, stages={**recipe.stages, "upo": {**recipe.stages["upo"], **args}})

    with pytest.raises(UserError, match=r"stages.upo.upo_offline_dataset \(its train split\): 'train' is not a "
                                        r"split of .*pairs \(it has: test\)"):
        check_recipe_files(upo(upo_offline_dataset=str(tmp_path / "pairs")))
    check_recipe_files(upo(upo_offline_dataset=str(tmp_path / "pairs"), upo_mode="online"))  # never read then
    with pytest.raises(UserError, match=r"stages.upo.phases\[1\].split: 'prompts' is not a split of .*logic"):
        check_recipe_files(upo(phases=[{"num_prompts": 2}, {"dataset_name": str(tmp_path / "logic")}]))
    check_recipe_files(upo(phases=[{"dataset_name": str(tmp_path / "logic"), "split": "train"}]))


def test_the_smallest_values_a_stage_takes_pass(tmp_path):
    """The minimums are allowed values: a batch of one row, a rank-1 LoRA, a learning rate of 0 (a dry run of the
    plumbing), a LoRA+ ratio of 1 (plain LoRA)."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", [
        "shared.per_device_train_batch_size=1", "shared.lora_r=1", "stages.sft.learning_rate=0",
        "shared.loraplus_lr_ratio=1"])
    assert recipe.stages["sft"]["per_device_train_batch_size"] == 1 and recipe.stages["dpo"]["lora_r"] == 1
    assert recipe.stages["sft"]["learning_rate"] == 0 and recipe.stages["upo"]["loraplus_lr_ratio"] == 1


def test_a_later_stage_may_repeat_the_first_stages_adapter_settings(tmp_path):
    """A later stage continues the first stage's adapter: its LoRA settings are refused only where they differ from
    the first stage's (they would be ignored), not where they repeat them."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.dpo.lora_r=8", "stages.upo.use_peft=true"])
    assert recipe.stages["dpo"]["lora_r"] == recipe.stages["sft"]["lora_r"] == 8
    with pytest.raises(UserError, match="stages.dpo.lora_r: 4, but dpo continues the adapter that sft creates"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.dpo.lora_r=4"])


def test_a_value_is_used_as_checked(tmp_path):
    """`5e-2` is a string to PyYAML (YAML 1.1); the section is built from the float it is checked as."""
    path = _write(tmp_path, TINY.replace("gate: {metric: accuracy}", "gate: {metric: accuracy, max_drop: 5e-2}"))
    assert load_recipe(path).gates["sft"].max_drop == 0.05


def test_a_number_key_written_twice_is_refused(tmp_path):
    """YAML reads `8:` as a number: a number key written twice in one mapping is two edits of one value too."""
    from posttrain.recipe_yaml import read_recipe

    with pytest.raises(UserError, match=r"key '8' appears twice in one mapping \(first on line 3\)"):
        read_recipe(_write(tmp_path, "ablation:\n  variants:\n    8: {}\n    8: {}\n"))


def test_a_recipe_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes("name: caf\xe9\nbase: {model_name_or_path: tiny:llama}\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"recipe.yaml:1: not UTF-8 text \(byte 0xe9 at byte offset 9\)"):
        load_recipe(path)


@pytest.mark.parametrize("name", ["", None, ["a"], 5, ".", "..", "../escape", "a/b", "/abs", "two words"])
def test_the_name_is_one_plain_folder_name(tmp_path, name):
    """The run folder is OUTPUT_DIR/<name>: never `None/`, OUTPUT_DIR itself or a folder outside it."""
    with pytest.raises(UserError, match="name: .* cannot name the run's folder"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", raw={**yaml.safe_load(TINY), "name": name})
    assert load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["name=v1.2_a-b"]).name == "v1.2_a-b"


def test_an_override_fills_a_section_the_file_leaves_empty(tmp_path):
    path = _write(tmp_path, "name: empty\nbase: {model_name_or_path: tiny:llama}\nshared:\nstages:\n  sft:\n")
    recipe = load_recipe(path, ["stages.sft.max_steps=5", "shared.lora_r=4"])
    assert recipe.stages["sft"]["max_steps"] == 5 and recipe.stages["sft"]["lora_r"] == 4


def test_a_lone_value_where_trl_takes_a_list(tmp_path):
    """TRL documents `str | list[str]` for these and its parser takes one value; so does a recipe, as a list of one
    (ModelConfig unwraps a one-item lora_target_modules, DPOConfig wraps a lone loss_type itself). List items get
    the float reading a lone value gets (`1e-1` is a string to PyYAML)."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml",
                         ["shared.lora_target_modules=all-linear", "stages.dpo.loss_type=sigmoid"])
    assert recipe.stages["sft"]["lora_target_modules"] == ["all-linear"] and recipe.stages["dpo"]["loss_type"] == [
        "sigmoid"]
    path = _write(tmp_path, TINY.replace("    beta: 0.1\n", "    beta: 0.1\n    loss_type: [sigmoid, sft]\n"
                                                         "    loss_weights: [1e-1, 1]\n"))
    assert load_recipe(path).stages["dpo"]["loss_weights"] == [0.1, 1]
    with pytest.raises(UserError, match=r"stages.dpo.loss_weights: \['a'\] \(list\) is not a valid list\[float\]"):
        load_recipe(path, ["stages.dpo.loss_weights=[a]"])


def test_override_values_are_read_as_their_field_takes_them():
    """A text field keeps the text as typed; other values are YAML 1.2 plain scalars, not YAML 1.1's octal,
    base-60 and yes/no."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", [
        "stages.sft.seed=010", "base.model_revision=1.10", "stages.sft.run_name=exp #3", "stages.dpo.run_name='a #b'",
        "stages.sft.dataset_test_split=null", "stages.upo.num_generations=4", "eval.split=2024", "description=on"])
    sft = recipe.stages["sft"]
    assert sft["seed"] == 10 and recipe.base.model_revision == "1.10" and sft["run_name"] == "exp #3"
    assert recipe.stages["dpo"]["run_name"] == "a #b" and sft["dataset_test_split"] is None
    assert recipe.eval.split == "2024" and recipe.raw["description"] == "on"
    assert load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["shared.use_peft=true"]).stages["sft"]["use_peft"] is True


def test_a_flag_takes_its_minimum_and_refuses_less():
    """`posttrain eval --batch-size 1 --samples 0`: the minimum a field states is a value its flag takes."""
    import argparse

    from posttrain.configs import EvalArguments, add_dataclass_arguments

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EvalArguments)
    args = parser.parse_args(["--batch-size", "1", "--samples", "0", "--max-new-tokens", "1"])
    assert (args.batch_size, args.samples, args.max_new_tokens) == (1, 0, 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-size", "0"])


def test_a_shared_override_that_stages_shadow_is_named(capsys):
    """`shared.learning_rate=...` changes nothing when every stage sets its own learning rate: said, not silent."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["shared.learning_rate=5e-5", "shared.lora_r=4"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "override 'shared.learning_rate=5e-5': stage(s) sft, dpo, upo set learning_rate themselves, so it " \
           "changes nothing" in shown
    assert "lora_r" not in shown and recipe.stages["sft"]["lora_r"] == 4


def test_a_shipped_recipe_is_found_by_its_readme_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("recipes/tiny/text.yaml").name == "tiny-text"
    with pytest.raises(UserError, match="recipe not found: recipes/tiny/nope.yaml"):
        load_recipe("recipes/tiny/nope.yaml")


def test_full_module_copies_in_bf16_are_warned_about(capsys):
    """PEFT trains `lora_modules_to_save` copies in the base's dtype: in bf16 a norm's 1.0 stayed 1.0 through SFT, DPO
    and UPO. Said when the recipe loads (larger updates do train: a warning, not an error)."""
    load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["shared.dtype=bfloat16", "shared.lora_modules_to_save=[norm]"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "shared.lora_modules_to_save with shared.dtype: bfloat16" in shown and "dtype: float32 keeps them" in shown
    load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["shared.lora_modules_to_save=[norm]"])
    assert "lora_modules_to_save with" not in capsys.readouterr().out


def test_an_accelerator_package_a_stage_asks_for_and_lacks_is_refused_at_load(monkeypatch):
    """GRPO refuses `use_vllm` without vLLM, and a trainer `use_liger_kernel` without liger-kernel, only when it is
    built: for UPO after the data jobs, SFT and DPO."""
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = {"vllm", "liger_kernel"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    with pytest.raises(UserError, match=r"stages.upo.use_vllm: true, but vLLM is not installed"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.upo.use_vllm=true"])
    with pytest.raises(UserError, match=r"stages.dpo.use_liger_kernel: true, but liger-kernel is not installed"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.dpo.use_liger_kernel=true"])


@pytest.mark.parametrize("name", ["..", "../escape", "a/b", "/abs"])
def test_a_data_name_is_one_plain_folder_name(tmp_path, name):
    """A data job's output `<run>/data/<name>` replaces whatever folder is there: a name that leaves the run folder
    would delete a folder anywhere."""
    raw = yaml.safe_load(TINY)
    raw["data"] = {name: raw["data"]["verifiable"]}
    with pytest.raises(UserError, match="data: .* cannot name a data set's folder"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", raw=raw)


@pytest.mark.parametrize("where", ["shared", "stages.sft"])
def test_a_token_in_a_recipe_is_refused(where):
    """The recipe is copied into resolved.yaml, the report and the model card pushed to the Hub."""
    with pytest.raises(UserError, match=f"{where}.hub_token: .*HF_TOKEN"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", [f"{where}.hub_token=hf_secret"])


@pytest.mark.parametrize("url", ["http://user:s3cret@vllm.internal:8000", "https://s3cret@vllm.internal"])
def test_a_url_with_credentials_in_a_recipe_is_refused(url):
    """`http://user:pass@host` was written as it is into recipe.yaml, resolved.yaml, the report and the model card; the
    error says where the credentials go instead (TRL's vLLM client sends ~/.netrc's through requests) and not them."""
    with pytest.raises(UserError, match=r"stages.upo.vllm_server_base_url: the URL carries credentials.*~/.netrc") as e:
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", [f"stages.upo.vllm_server_base_url={url}"])
    assert "s3cret" not in str(e.value)
    load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", ["stages.upo.vllm_server_base_url=http://vllm.internal:8000"])


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = "\n".join([" a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                     + [f" a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)])
    with pytest.raises(UserError, match="more than 100,000 values once its YAML aliases"):
        load_recipe(_write(tmp_path, TINY + "description: x\nshared_junk:\n" + bomb + "\n"))


@pytest.mark.parametrize("key", ["load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                                 "bnb_4bit_quant_storage"])
def test_a_quantized_base_is_refused_not_ignored(key):
    """TRL's ModelConfig takes QLoRA's flags, but posttrain loads the base model itself and merges LoRA into it for
    evaluation, rollouts and export: a recipe that set them trained in full precision without a word."""
    with pytest.raises(UserError, match=f"shared.{key}: a 4/8-bit base model \\(QLoRA\\) is not supported"):
        load_recipe(ROOT / "recipes" / "tiny" / "text.yaml", [f"shared.{key}=true"])


def test_the_readmes_recipe_block_is_the_shipped_default_abridged():
    """The Recipes section shows the default recipe abridged: every value it shows is the shipped file's (it showed
    other step counts and lengths), except where its SFT reads the plain verifiable tasks and the file its mix."""
    readme = (ROOT / "README.md").read_text()
    block = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    shipped = yaml.safe_load((ROOT / "recipes" / "text" / "smollm2-135m.yaml").read_text())

    mix = (".stages.sft.dataset_name", ".stages.sft.dataset_train_split")  # the plain tasks' split, not the mix

    def shown(part, full, where):
        if isinstance(part, dict):
            for key, value in part.items():
                if f"{where}.{key}" not in mix:
                    assert key in full, f"{where}.{key} is not in the shipped recipe"
                    shown(value, full[key], f"{where}.{key}")
        else:
            assert part == full, f"{where}: README {part!r}, shipped {full!r}"

    shown(block, shipped, "")


# ------------------------------------------------------------------------------------------------ found by mutants
TINY_PATH = ROOT / "recipes" / "tiny" / "text.yaml"


def test_a_recipe_without_modality_is_text(tmp_path):
    assert load_recipe(_write(tmp_path, TINY.replace("modality: text\n", ""))).modality == "text"


def test_a_recipe_file_in_the_working_folder_wins_over_the_shipped_one(tmp_path, monkeypatch):
    """`recipes/tiny/text.yaml` in the working folder (a user's edited copy) is the one run, not the shipped file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes" / "tiny").mkdir(parents=True)
    (tmp_path / "recipes" / "tiny" / "text.yaml").write_text(TINY.replace("name: tiny-text", "name: mine"))
    assert load_recipe("recipes/tiny/text.yaml").name == "mine"


def test_credentials_in_a_list_are_refused_and_named_by_their_key():
    raw = {**yaml.safe_load(TINY), "data": {"mix": {"job": "build_sft_set",
                                                    "sources": ["a.jsonl", "https://u:s3cret@host/b.jsonl"]}}}
    with pytest.raises(UserError, match=r"text.yaml: data.mix.sources\[1\]: the URL carries credentials"):
        load_recipe(TINY_PATH, raw=raw)


def test_a_path_is_found_from_the_working_folder_then_the_recipes_then_the_repository(tmp_path, monkeypatch):
    from posttrain.recipe import resolve_relative

    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
        (folder / "x.jsonl").write_text("{}\n")
    monkeypatch.chdir(here)
    assert resolve_relative("x.jsonl", there / "r.yaml") == here / "x.jsonl"
    monkeypatch.chdir(tmp_path)
    assert resolve_relative("x.jsonl", there / "r.yaml") == there / "x.jsonl"
    assert resolve_relative("recipes/accelerate/ddp.yaml", there / "r.yaml") == ROOT / "recipes/accelerate/ddp.yaml"
    assert resolve_relative("absent.jsonl", there / "r.yaml") == Path("absent.jsonl")


def test_upo_offline_pairs_and_phase_files_beside_the_recipe_are_found_from_any_folder(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    for name in ("pairs.jsonl", "logic.jsonl", "held_out.jsonl"):
        (recipe.parent / name).write_text("{}\n")
    recipe.write_text(TINY)
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe, ["stages.upo.upo_offline_dataset=pairs.jsonl", "eval.dataset=held_out.jsonl",
                                  "stages.upo.phases=[{dataset_name: logic.jsonl}, {num_prompts: 2}]"])
    assert loaded.stages["upo"]["upo_offline_dataset"] == str(recipe.parent / "pairs.jsonl")
    assert loaded.stages["upo"]["phases"] == [{"dataset_name": str(recipe.parent / "logic.jsonl")}, {"num_prompts": 2}]
    assert loaded.eval.dataset == str(recipe.parent / "held_out.jsonl")


@pytest.mark.parametrize("stages, named", [
    ("stages: {}\n", "stages: expected a mapping of stage name"),
    ("stages: {sft: [a]}\n", "stages.sft: expected a mapping of argument names"),
    ("shared: [a]\nstages: {sft: {}}\n", "shared: expected a mapping of argument names"),
])
def test_stages_and_shared_that_are_no_mappings_are_named(tmp_path, stages, named):
    path = _write(tmp_path, "name: x\nbase: {model_name_or_path: tiny:llama}\n" + stages)
    with pytest.raises(UserError, match=named):
        load_recipe(path)


@pytest.mark.parametrize("override, named", [
    ("stages.sft.learning_rate=-1e-4", "stages.sft.learning_rate: -0.0001 is below the minimum of 0"),
    ("shared.per_device_train_batch_size=0", "shared.per_device_train_batch_size: 0 is below the minimum of 1"),
    ("shared.use_peft=1", r"shared.use_peft: 1 \(int\) is not a valid bool"),
    ("stages.sft.learning_rate=true", r"stages.sft.learning_rate: True \(bool\) is not a valid float"),
    ("stages.sft.trust_remote_code=true", "stages.sft.trust_remote_code: set by the pipeline"),
    ("stages.sft.eval_limit=3", "stages.sft.eval_limit: set by the pipeline"),
])
def test_a_value_a_stage_would_refuse_late_is_refused_at_load(override, named):
    with pytest.raises(UserError, match=named):
        load_recipe(TINY_PATH, [override])


def test_full_module_copies_in_fp16_are_warned_about_too(capsys):
    load_recipe(TINY_PATH, ["shared.dtype=float16", "shared.lora_modules_to_save=[norm]"])
    assert "lora_modules_to_save with shared.dtype: float16" in " ".join(capsys.readouterr().out.split())


def test_upo_takes_the_random_sampling_strategy_it_uses_anyway():
    assert load_recipe(TINY_PATH, ["shared.train_sampling_strategy=random"]).stages["upo"][
        "train_sampling_strategy"] == "random"


def test_override_values_keep_their_sign_case_and_equals_signs():
    recipe = load_recipe(TINY_PATH, ["stages.sft.seed=-1", "shared.use_peft=True", "stages.sft.run_name=a=b"])
    assert recipe.stages["sft"]["seed"] == -1 and recipe.stages["sft"]["run_name"] == "a=b"
    assert recipe.stages["dpo"]["use_peft"] is True


def test_the_first_class_with_a_name_gives_its_type_and_init_only_fields_are_keys():
    import dataclasses

    from posttrain.typecheck import field_types

    @dataclasses.dataclass
    class First:
        shared: int = 0

    @dataclasses.dataclass
    class Second:
        shared: str = ""
        derived: int = dataclasses.field(init=False, default=0)

    assert field_types((First, Second)) == {"shared": int}


def test_check_type_on_enums_float_literals_and_lists():
    """A plain enum takes its values and its member names; `Enum | str` (TrainingArguments' way) only the values, named
    in the refusal, and None where the union has it; `Enum | None` is an enum, not `Enum | str`. A YAML string float
    is a float only where the float fits, and None is no list. Each reads the same from the key table kept on disk."""
    import enum
    from typing import Any, Literal

    from posttrain.typecheck import annotation_from_json, annotation_to_json, check_type

    class Color(enum.Enum):
        RED = "red"
        GREEN = "green"

    assert check_type("RED", Color, "x") == check_type("RED", Color | None, "x") == "RED"
    assert check_type(None, Color | str | None, "x") is None
    with pytest.raises(UserError, match=r"^x: 'blue'; expected one of: red, green$"):
        check_type("blue", Color | str, "x")
    with pytest.raises(UserError, match=r"^x: '3e0'; expected one of: 0.5, 1.0$"):
        check_type("3e0", Literal[0.5, 1.0], "x")
    with pytest.raises(UserError, match=r"x: None \(NoneType\) is not a valid list"):
        check_type(None, list[Any], "x")
    for annotation, good, bad in [(Color | str | None, [None, "red"], ["RED"]), (Color, ["red", "RED"], ["blue"]),
                                  (list[int], [[1]], [["a"]])]:  # the same once written as JSON and read back
        again = annotation_from_json(annotation_to_json(annotation))
        assert [check_type(value, again, "x") for value in good] == good
        for value in bad:
            with pytest.raises(UserError):
                check_type(value, again, "x")


@pytest.mark.parametrize("overrides, named", [
    (["eval.dataset={data}/pairs"], "eval.dataset: {data}/pairs is built after stage 'sft' (data.pairs.after), which "
                                    "does not run before the base model's evaluation"),
    (["stages.sft.dataset_name={data}/pairs", "stages.sft.dataset_train_split=train"],
     "stages.sft.dataset_name: {data}/pairs is built after stage 'sft' (data.pairs.after), which does not run before "
     "sft"),
    (["stages.sft.dataset_test_split=tset", "stages.sft.eval_strategy=steps"],
     "stages.sft.dataset_test_split: 'tset' is not a split of {data}/verifiable"),
    (["stages.upo.phases=[{dataset_name: '{data}/pairs'}]"],
     "stages.upo.phases[0].split: 'prompts' is not a split of {data}/pairs"),
    (["stages.sft.dataset_name={data/verifiable"], "stages.sft.dataset_name: {data/verifiable: not a placeholder"),
])
def test_data_read_before_it_is_built_or_in_a_split_it_lacks_is_named(overrides, named):
    from posttrain.recipe_files import check_recipe_files

    with pytest.raises(UserError) as error:
        check_recipe_files(load_recipe(TINY_PATH, overrides))
    assert named in " ".join(str(error.value).split())


def test_a_yaml_merge_key_is_not_taken_for_a_key_written_twice(tmp_path):
    from posttrain.recipe_yaml import read_recipe

    assert read_recipe(_write(tmp_path, "a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n"))["b"] == {"x": 3, "y": 2}
