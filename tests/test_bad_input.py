"""Bad input of every kind stops with one paragraph that names the file, row or key, never a traceback.

Recipes and overrides go through the CLI's own `main` in-process (exit code and printed text as a user sees them);
data files and pre-flight gates through the functions the stages call; one broken stage through the real CLI, where
what matters is what reaches the terminal from a stage process.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset

from posttrain import gates
from posttrain.cli import main as cli_main
from posttrain.data import load_split
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny" / "text.yaml"


def _tiny() -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw.pop("ablation")
    return raw


def _set(path: str, value):
    def change(raw):
        *keys, last = path.split(".")
        node = raw
        for key in keys:
            node = node[key]
        node[last] = value
        return raw
    return change


def _drop(path: str):
    def change(raw):
        *keys, last = path.split(".")
        node = raw
        for key in keys:
            node = node[key]
        del node[last]
        return raw
    return change


# (id, how the recipe is broken, overrides, what the message must name)
RECIPES = [
    ("not-yaml", "text:name: [", [], ["recipe.yaml", "not valid YAML"]),
    ("a-list", "text:- a\n- b\n", [], ["recipe.yaml", "a recipe is a mapping"]),
    ("unknown-top-key", _set("stagez", {}), [], ["recipe.yaml", "'stagez'"]),
    ("missing-stages", _drop("stages"), [], ["recipe.yaml", "missing required key 'stages'"]),
    ("typo-did-you-mean", _set("stages.sft.learning_rat", 1e-3), [], ["stages.sft.learning_rat", "learning_rate"]),
    ("reserved-key", _set("stages.sft.output_dir", "x"), [], ["stages.sft.output_dir", "set by the pipeline"]),
    ("wrong-type", _set("shared.lora_r", "eight"), [], ["shared.lora_r", "'eight'", "int"]),
    ("unknown-stage", _set("stages.ppo", {}), [], ["stages: 'ppo' is not a stage"]),
    ("bad-modality", _set("modality", "audio"), [], ["modality: 'audio'"]),
    ("unknown-job", _set("data.verifiable.job", "build_everything"), [], ["data.verifiable.job", "build_everything"]),
    ("unknown-job-arg", _set("data.verifiable.n_trian", 3), [], ["data.verifiable.n_trian", "n_train"]),
    ("after-unknown-stage", _set("data.pairs.after", "ppo"), [], ["data.pairs.after", "'ppo'"]),
    # a job that runs after SFT: its options are still checked before any work
    ("bad-pairs-dtype", _set("data.pairs.dtype", "float16"), [], ["data.pairs.dtype", "'float16'", "float32, bfloat16"]),
    # a count the job cannot use: it wrote no training rows, and SFT failed after the base evaluation
    ("data-job-count-below-minimum", _set("data.verifiable.n_train", -1), [],
     ["recipe.yaml: data.verifiable.n_train: -1 is below the minimum of 1"]),
    ("bad-eval-dtype", _set("eval.dtype", "bf16"), [], ["eval.dtype", "'bf16'", "float32, bfloat16"]),
    ("missing-dataset-file", _set("stages.sft.dataset_name", "data/absent.jsonl"), [],
     ["stages.sft.dataset_name", "data/absent.jsonl", "before any work"]),
    ("missing-offline-pairs", _set("stages.upo.upo_offline_dataset", "prefs/none.parquet"), [],
     ["stages.upo.upo_offline_dataset", "prefs/none.parquet"]),
    ("data-nobody-builds", _set("eval.dataset", "{data}/heldout"), [], ["eval.dataset", "'heldout'", "verifiable"]),
    ("missing-template", _set("base.chat_template", "templates/mine.jinja"), [],
     ["base.chat_template", "templates/mine.jinja"]),
    # refused at the base step, after resolving (downloading) the base model
    ("unknown-template-name", _set("base.chat_template", "chatmll"), [],
     ["recipe.yaml: base.chat_template: chat template 'chatmll' is neither a built-in (chatml,",
      "did you mean chatml"]),
    ("missing-job-source", _set("data.extra", {"job": "build_sft_set", "sources": [{"path": "src/chat.jsonl"}]}), [],
     ["data.extra.sources[0].path", "src/chat.jsonl"]),
    ("missing-accelerate-config", _set("accelerate_config", "acc/none.yaml"), [], ["accelerate_config", "none.yaml"]),
    ("override-bad-yaml", None, ["shared.lora_r=[1"], ["override 'shared.lora_r=[1'", "not valid YAML"]),
    ("override-no-equals", None, ["shared.lora_r"], ["override 'shared.lora_r'", "section.key=value"]),
    ("override-into-scalar", None, ["name.x=1"], ["override 'name.x=1'", "'name' is not a mapping"]),
    ("override-unknown-key", None, ["stages.dpo.betta=0.2"], ["stages.dpo.betta", "beta"]),
    ("override-wrong-type", None, ["stages.sft.max_steps=many"], ["stages.sft.max_steps", "'many'"]),
    ("accelerate-config-a-number", _set("accelerate_config", 5), [], ["accelerate_config: 5 (int)", "str"]),
    ("accelerate-config-a-list", _set("accelerate_config", ["a.yaml"]), [],
     ["accelerate_config: ['a.yaml'] (list)", "str"]),
    ("eval-batch-size-zero", _set("eval.batch_size", 0), [], ["eval.batch_size: 0 is below the minimum of 1"]),
    ("eval-max-new-tokens-zero", None, ["eval.max_new_tokens=0"], ["eval.max_new_tokens: 0 is below the minimum"]),
    ("name-leaves-the-output-dir", None, ["name=../escape"], ["name: '../escape' cannot name the run's folder"]),
    ("name-a-list", _set("name", ["a"]), [], ["name: ['a'] cannot name the run's folder"]),
    ("a-second-sft-stage", lambda raw: {**raw, "stages": {**raw["stages"], "sft2": raw["stages"]["sft"]}}, [],
     ["stages: 'sft2' is not a stage; the stages are sft, dpo, upo, each at most once, under its own name (SFT on two "
      "datasets: one data job building a set from both"]),
    # what a stage would refuse only when it starts, after the stages before it
    ("unknown-reward", _set("stages.upo.rewards", {"acuracy": 1.0}), [],
     ["stages.upo.rewards: 'acuracy' is not a reward (did you mean accuracy?)"]),
    # a weight the trainer met only after loading the model: float('high') raised a bare ValueError, nan trained nothing
    ("reward-weight-not-a-number", _set("stages.upo.rewards", {"accuracy": "high"}), [],
     ["stages.upo.rewards: 'accuracy' has the weight 'high'; expected a finite number"]),
    ("reward-weight-nan", _set("stages.upo.rewards", {"accuracy": float("nan")}), [],
     ["stages.upo.rewards: 'accuracy' has the weight nan"]),
    ("no-reward", _set("stages.upo.rewards", {}), [], ["stages.upo.rewards: no reward named"]),
    # transformers' length sampler reads `input_ids`, which DPO's tokenized pairs lack: a bare ValueError in the stage
    ("dpo-group-by-length", _set("stages.dpo.train_sampling_strategy", "group_by_length"), [],
     ["stages.dpo.train_sampling_strategy: group_by_length does not work for DPO"]),
    ("dpo-batch-rebalance", _set("stages.dpo.train_sampling_strategy", "batch_rebalance"), [],
     ["stages.dpo.train_sampling_strategy: batch_rebalance does not work for DPO"]),
    ("upo-sampling-strategy", _set("stages.upo.train_sampling_strategy", "sequential"), [],
     ["stages.upo.train_sampling_strategy: sequential is not used by UPO", "shuffle_dataset: false"]),
    ("rewards-not-a-mapping", None, ["stages.upo.rewards=accuracy"], ["stages.upo.rewards: 'accuracy'",
                                                                      "expected reward names with their weights"]),
    ("upo-mode-typo", _set("stages.upo.upo_mode", "onlin"), [],
     ["stages.upo.upo_mode: 'onlin'; expected one of: online, offline, both"]),
    # UPO's own value checks, found with the recipe rather than when the upo stage starts (after SFT and DPO)
    ("drop-uniform-groups-per-rollout-loss", None, ["stages.upo.drop_uniform_groups=true", "stages.upo.loss_type=grpo"],
     ["stages.upo: drop_uniform_groups needs a loss normalised by the batch's token count"]),
    ("offline-upo-without-pairs", None, ["stages.upo.upo_mode=offline", "stages.upo.upo_offline_dataset=null"],
     ["stages.upo: upo_mode 'offline' needs upo_offline_dataset"]),
    ("negative-upo-lambda", None, ["stages.upo.upo_lambda=-1"], ["stages.upo: upo_lambda must be >= 0; got -1"]),
    ("loraplus-below-one", _set("shared.loraplus_lr_ratio", 0.5), [],
     ["stages.sft: loraplus_lr_ratio must be at least 1", "got 0.5"]),
    ("lr-scheduler-typo", _set("stages.sft.lr_scheduler_type", "cosinee"), [],
     ["stages.sft.lr_scheduler_type: 'cosinee'; expected one of: linear, cosine"]),
    ("optim-typo", None, ["stages.dpo.optim=adamw_torh"], ["stages.dpo.optim: 'adamw_torh'; expected one of:"]),
    ("duplicate-key", "text:name: a\nbase: {model_name_or_path: tiny:llama}\nstages:\n  sft: {max_steps: 1, max_steps: 500}\n",
     [], ["recipe.yaml: not valid YAML: key 'max_steps' appears twice in one mapping (first on line 4)",
          'recipe.yaml", line 4, column 23']),
    ("yaml-error-names-the-file", "text:name: [", [], ['recipe.yaml", line 1, column 8']),
    # command-line values: YAML 1.2 plain scalars, a comment is never dropped silently
    ("override-base-60", None, ["stages.sft.max_steps=1:30"], ["stages.sft.max_steps: '1:30' (str) is not a valid int"]),
    ("override-yes-is-not-true", None, ["shared.use_peft=yes"], ["shared.use_peft: 'yes' (str) is not a valid bool"]),
    ("override-comment", None, ["stages.sft.seed=3 #x"],
     ["override 'stages.sft.seed=3 #x': '#x' would be read as a YAML comment and dropped"]),
    # found before any work rather than after the data jobs, the base evaluation or the stages before
    ("placeholder-typo", _set("stages.sft.dataset_name", "{dta}/verifiable"), [],
     ["stages.sft.dataset_name: {dta}/verifiable: not a placeholder; expected {data}, {run}, {base}"]),
    ("data-built-after-a-later-stage", lambda raw: {**raw, "stages": {s: raw["stages"][s] for s in ("dpo", "sft", "upo")}},
     [], ["stages.dpo.dataset_name: {data}/pairs is built after stage 'sft' (data.pairs.after)"]),
    ("data-job-reads-a-stage-before-it-runs", _drop("data.pairs.after"), [],
     ["data.pairs.adapter_path: {run}/sft is written by stage sft, but the job runs before every stage (no "
      "data.pairs.after); add `after: sft` to data.pairs"]),
    ("data-job-reads-a-stage-the-recipe-lacks",  # `after: sft` dropped as its own error asks, the adapter path kept
     lambda raw: _drop("data.pairs.after")({**raw, "stages": {"dpo": raw["stages"]["dpo"]}}), [],
     ["data.pairs.adapter_path: {run}/sft is stage sft's folder, but the recipe has no stage sft (stages: dpo)"]),
    ("eval-split-typo", _set("eval.split", "tset"), [], ["eval.split: 'tset' is not a split of {data}/verifiable (its "
                                                         "job build_verifiable_tasks writes: sft, prompts, test)"]),
    ("train-split-typo", _set("stages.sft.dataset_train_split", "stf"), [],
     ["stages.sft.dataset_train_split: 'stf' is not a split of {data}/verifiable"]),
    ("dpo-test-split-typo", _set("stages.dpo.dataset_test_split", "tst"), [],
     ["stages.dpo.dataset_test_split: 'tst' is not a split of {data}/pairs (its job build_onpolicy_pairs writes: "
      "train, test)"]),
    ("eval-split-its-job-leaves-out", _set("data.verifiable.n_test", 0), [],
     ["eval.split: 'test' is not a split of {data}/verifiable (its job build_verifiable_tasks writes: sft, prompts)"]),
    ("offline-hub-dataset", _set("stages.upo.dataset_name", "someone/missing-prompts"), [],
     ["stages.upo.dataset_name: dataset 'someone/missing-prompts' is not in the local Hugging Face cache"]),
    ("negative-learning-rate", _set("stages.sft.learning_rate", -1), [],
     ["stages.sft.learning_rate: -1 is below the minimum of 0"]),
    ("lora-r-zero", None, ["shared.lora_r=0"], ["shared.lora_r: 0 is below the minimum of 1"]),
    # refused by TRL inside the SFT stage, after the data jobs and the base evaluation
    ("lora-on-lm-head", None, ["shared.lora_target_modules=[q_proj,lm_head]"],
     ["shared.lora_target_modules: lm_head cannot take a LoRA"]),
    # DPO continues SFT's adapter: its own LoRA shape was written to its resolved.yaml and ignored
    ("later-stage-lora-shape", None, ["stages.dpo.use_dora=true"],
     ["stages.dpo.use_dora: True, but dpo continues the adapter that sft creates"]),
    ("a-key-yaml-reads-as-a-bool", lambda raw: {**raw, "shared": {**raw["shared"], True: 8}}, [],
     ["shared.True: unknown key"]),
]


@pytest.mark.parametrize("broken, overrides, named", [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES])
def test_bad_recipe_or_override(broken, overrides, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    if isinstance(broken, str):
        recipe.write_text(broken.removeprefix("text:"))
    else:
        recipe.write_text(yaml.safe_dump((broken or (lambda raw: raw))(_tiny()), sort_keys=False))
    code = cli_main(["run", str(recipe), *overrides, "--dry-run"])
    out = capsys.readouterr()
    shown = " ".join((out.out + out.err).split())  # the console wraps long lines
    assert code == 2
    for text in named:
        assert text in shown, f"{text!r} not in: {shown}"
    assert "Traceback" not in shown and "<unicode string>" not in shown
    assert not (tmp_path / "outputs").exists(), "nothing ran"


def test_a_local_folder_spelt_like_a_hub_id_passes_offline(tmp_path, capsys, monkeypatch):
    """`dataset_name: data/x`, a folder of the working directory written without `./`: offline, the check does not
    look for a Hub dataset `data/x` in the cache; the stage opens the folder (`data.load_split` reads a folder first)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "sft.parquet").write_bytes(b"")  # the split check reads the names only
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_set("stages.sft.dataset_name", "data/x")(_tiny()),
                                                       sort_keys=False))
    assert cli_main(["run", str(tmp_path / "recipe.yaml"), "--dry-run"]) == 0, capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Data files: what the stages load
# ----------------------------------------------------------------------------------------------------------------------
TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
FILES = [
    ("empty", "data.jsonl", b"", ["data.jsonl", "empty (0 bytes)"]),
    ("blank-lines", "data.jsonl", b"\n\n", ["data.jsonl", "cannot be read"]),
    ("binary-jsonl", "data.jsonl", bytes(range(256)) * 2, ["data.jsonl", "line 1", "not JSON"]),
    ("binary-parquet", "data.parquet", bytes(range(256)) * 2, ["data.parquet", "cannot be read as parquet"]),
    ("bad-second-line", "data.jsonl", b'{"messages": []}\n{"messages": [\n', ["data.jsonl", "line 2", "not JSON"]),
    ("list-line", "data.jsonl", b'{"a": 1}\n[1, 2]\n', ["data.jsonl", "line 2", "not a JSON object"]),
    # pyarrow's JSON reader (datasets') overflows its stack on such a row: SIGSEGV, not an exception
    ("nested-too-deep", "data.jsonl", b'{"messages": []}\n{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n",
     ["data.jsonl", "line 2", "nested too deeply"]),
    ("missing-file", "absent.jsonl", None, ["absent.jsonl", "not found"]),
    # pyarrow's JSON reader loads a GBK file; the stage failed on its first row with a UnicodeDecodeError, no file named
    ("gbk-jsonl", "data.jsonl", '{"messages": [{"role": "user", "content": "你好"}]}\n'.encode("gbk"),
     ["data.jsonl", "line 1", "column 44 is not UTF-8", "re-save the file as UTF-8"]),
]


@pytest.mark.parametrize("name, content, named", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_unreadable_data_file(name, content, named, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_split(str(path), "train")
    for text in named:
        assert text in str(error.value)


@pytest.mark.parametrize("name", ["data/sets/chat", "chat", "./org/name"])
def test_a_dataset_name_that_is_no_folder_file_or_hub_id_is_named(name, tmp_path, monkeypatch):
    """A path that does not exist (a typo, a missing folder) is not looked up on the Hub: only `org/name` is a Hub id."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"dataset '{re.escape(name)}' is not a folder, a data file or a Hub id"):
        load_split(name, "train")


def test_missing_split_of_a_data_folder(tmp_path):
    Dataset.from_list([{"messages": TURNS}]).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(UserError, match=r"no 'sft.parquet' \(train.parquet\)"):
        load_split(str(tmp_path), "sft")


def tool_turns(arguments, name: str = "get_weather") -> list[dict]:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "windy"},
            {"role": "assistant", "content": "Sunny and windy."}]


TOOL_TURNS = tool_turns({"city": "Oslo"})


CONVERSATIONS = [
    ("row-without-messages", [{"messages": TURNS}, {"messages": None, "text": "x"}],
     r'row 2 \(counting from 1\): "messages" is missing'),
    ("messages-a-string", [{"messages": TURNS}, {"messages": "hello"}],
     r'row 2 \(counting from 1\): "messages" is a str'),
    ("no-assistant-turn", [{"messages": TURNS[:1]}], r"row 1 \(counting from 1\): no assistant turn"),
    ("empty-assistant-turn", [{"messages": [TURNS[0], {"role": "assistant", "content": " "}]}],
     r"row 1 \(counting from 1\): assistant turn 1 is empty"),
    # before the template renders the rows: a bare Jinja or TypeError otherwise, reported as a bug
    ("turn-without-role", [{"messages": [{"content": "hi"}, TURNS[1]]}],
     r"row 1 \(counting from 1\): turn 1 has no role"),
    ("turn-with-an-empty-role", [{"messages": [{"role": "", "content": "hi"}, TURNS[1]]}],
     r"row 1 \(counting from 1\): turn 1 has no role"),
    ("content-a-number", [{"messages": [{"role": "user", "content": 5}, TURNS[1]]}],
     r"row 1 \(counting from 1\): turn 1 \(user\) has content 5 \(int\)"),
    ("content-missing", [{"messages": [TURNS[0], {"role": "assistant"}]}],
     r"row 1 \(counting from 1\): turn 2 \(assistant\) has no content"),
    ("sharegpt-roles", [{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hey"}]}],
     r"row 1 \(counting from 1\): no assistant turn \(roles: gpt, human\)"),
    # tool rows: a bare JSONDecodeError, misleading advice, or (past the first tool row) nothing at all before
    ("tool-arguments-not-json", [{"messages": TOOL_TURNS}, {"messages": tool_turns('{"city": Oslo')}],
     r"row 2 \(counting from 1\): turn 2 \(assistant\) tool call 1: arguments '\{\"city\": Oslo' are not valid JSON"),
    ("tool-arguments-a-list", [{"messages": tool_turns('["Oslo"]')}],
     r"row 1 \(counting from 1\): turn 2 \(assistant\) tool call 1: arguments are \['Oslo'\]; expected a JSON object"),
    ("tool-call-without-name", [{"messages": tool_turns({"city": "Oslo"}, name="")}],
     r"row 1 \(counting from 1\): turn 2 \(assistant\) tool call 1: has no function name"),
    ("tool-result-without-call", [{"messages": [TURNS[0], {"role": "tool", "content": "sunny"}, TURNS[1]]}],
     r"row 1 \(counting from 1\): turn 2 is a tool result with no tool call before it"),
    ("tool-result-after-the-reply", [{"messages": [*TOOL_TURNS, {"role": "tool", "content": "rainy"}]}],
     r"row 1 \(counting from 1\): turn 6 is a tool result with no tool call before it"),
]


@pytest.mark.parametrize("rows, named", [c[1:] for c in CONVERSATIONS], ids=[c[0] for c in CONVERSATIONS])
def test_sft_gate_names_the_row(rows, named, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(UserError, match=named) as error:
        gates.check_conversations(load_split(str(path)), str(path))
    assert str(path) in str(error.value)
    gates.check_conversations(Dataset.from_list([{"messages": TOOL_TURNS}]), "tools.jsonl")  # a good tool row passes
    gates.check_conversations(Dataset.from_list([{"messages": tool_turns('{"city": "Oslo"}')}]), "tools.jsonl")
    no_content = [{**turn, "content": None} if turn.get("tool_calls") else turn for turn in TOOL_TURNS]
    gates.check_conversations(Dataset.from_list([{"messages": no_content}]), "tools.jsonl")  # a call needs no content


@pytest.mark.parametrize("rows, named", [
    ([{"instruction": "add 1 and 2", "output": "3"}], "has: instruction, output. Other formats"),
    ([{"prompt": "add 1 and 2"}], "`completion`, or `text`; it has: prompt."),
    ([], "no rows to train on"),
], ids=["alpaca-columns", "prompt-without-completion", "empty"])
def test_sft_gate_names_a_format_it_cannot_train_on(rows, named):
    """Rows in no format SFTTrainer reads: the stage would keep none of their columns and TRL would stop with a bare
    StopIteration; the gate names the file, its columns and the way to convert them."""
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"messages": []})
    with pytest.raises(UserError, match=re.escape(named)) as error:
        gates.check_sft_columns(dataset, "alpaca.jsonl")
    assert "alpaca.jsonl" in str(error.value)
    gates.check_sft_columns(Dataset.from_list([{"messages": TURNS}]), "chat.jsonl")  # a readable format passes
    gates.check_sft_columns(Dataset.from_list([{"body": "plain text"}]), "lm.jsonl", text_field="body")
    text_pairs = Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": "4"}])
    gates.check_sft_columns(text_pairs, "pc.jsonl")
    with pytest.raises(UserError, match="pc.jsonl: assistant_only_loss needs conversational rows"):
        gates.check_sft_columns(text_pairs, "pc.jsonl", assistant_only_loss=True)
    gates.check_sft_columns(Dataset.from_list([{"messages": TURNS}]), "chat.jsonl", assistant_only_loss=True)


@pytest.mark.parametrize("tools, named", [
    ('[{"type": "function", "function": {"name": "get_weather"', r'"tools" is text that is not valid JSON'),
    ('{"name": "get_weather"}', r'"tools" is \{\'name\': \'get_weather\'\}; expected a list of function schemas'),
    ('[{"type": "function", "function": {"name": "f"}}, "get_weather"]',
     r'"tools" is \[.*; expected a list of function schemas'),
], ids=["not-json", "one-schema-not-a-list", "a-name-among-the-schemas"])
def test_a_bad_tools_column_is_named_before_trl_reads_it(tools, named, tiny_tokenizer, tmp_path):
    """TRL (and the gates that render rows as it does) stopped on it with a bare JSONDecodeError, or transformers'
    "Tools should either be a JSON schema, or a callable function"."""
    from posttrain.stages.pairs import load_pairs

    good = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({**_pair(i), "tools": t}) + "\n" for i, t in enumerate([good, None, tools])))
    stage = SimpleNamespace(dataset_name=str(path), dataset_config=None, preflight=True, skip_bad_rows=False)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} \(train\) row 3 \(counting from 1\): {named}"):
        load_pairs(stage, "train", tiny_tokenizer, 1024)
    gates.check_tools_column(load_split(str(path)).select([0, 1]), "prefs.jsonl")  # schemas, as text or none, pass


def _pair(i, chosen="right", rejected="wrong"):
    return {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": chosen, "rejected": rejected}


PAIRS = [
    ("chosen-equals-rejected", [_pair(0), _pair(1, "same", "same")], r"row 2 \(counting from 1\): chosen == rejected"),
    ("rejected-null", [_pair(0), _pair(1, rejected=None)], r'row 2 \(counting from 1\): "rejected" is not a reply'),
    ("chosen-empty", [_pair(0, chosen="  ")], r'row 1 \(counting from 1\): "chosen" is empty'),
    ("missing-column", [{"prompt": "q", "chosen": "a"}], "missing: rejected"),
    # TRL opens the reply after the prompt's last turn: a second assistant turn in a row, or an answer to no question
    ("prompt-ends-on-a-reply", [_pair(0), {**_pair(1), "prompt": [*_pair(1)["prompt"], TURNS[1]]}],
     r"row 2 \(counting from 1\): the prompt ends on a turn of role 'assistant'; expected its last turn to be the "
     r"user's \(or a tool result\)"),
    ("prompt-of-a-system-turn", [{**_pair(0), "prompt": [{"role": "system", "content": "Be brief."}]}],
     r"row 1 \(counting from 1\): the prompt ends on a turn of role 'system'"),
]


@pytest.mark.parametrize("rows, named", [c[1:] for c in PAIRS], ids=[c[0] for c in PAIRS])
def test_pair_gate_names_the_row(rows, named):
    with pytest.raises(UserError, match=named) as error:
        gates.check_preference_pairs(Dataset.from_list(rows), "prefs.jsonl")
    assert "prefs.jsonl" in str(error.value)


def test_pair_and_prompt_gates_take_multi_turn_prompts_that_end_on_the_question():
    system = {"role": "system", "content": "Be brief."}
    prompt = [system, TURNS[0], TURNS[1], {"role": "user", "content": "and again?"}]
    gates.check_preference_pairs(Dataset.from_list([{**_pair(0), "prompt": prompt}]), "prefs.jsonl")
    gates.check_prompt_rows(Dataset.from_list([{"prompt": prompt, "answer": "4"}]), "prompts.jsonl")
    # a reply may answer a tool result: the prompt ends on the `tool` turn
    gates.check_preference_pairs(Dataset.from_list([{**_pair(0), "prompt": TOOL_TURNS[:4]}]), "prefs.jsonl")
    gates.check_prompt_rows(Dataset.from_list([{"prompt": TOOL_TURNS[:4], "answer": "4"}]), "prompts.jsonl")
    with pytest.raises(UserError, match=r"prompts.jsonl row 2 \(counting from 1\): the prompt ends on a turn of role "
                                        "'assistant'"):
        gates.check_prompt_rows(Dataset.from_list([{"prompt": p, "answer": "4"} for p in (prompt, prompt[:3])]),
                                "prompts.jsonl")
    with pytest.raises(UserError, match=r"prompts.jsonl row 1 \(counting from 1\): the prompt ends on a turn"):
        gates.check_prompt_rows(Dataset.from_list([{"prompt": prompt[:3], "answer": "4"}]), "prompts.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# UPO's pre-flight: rewards' reference column, offline pairs
# ----------------------------------------------------------------------------------------------------------------------
def _prompts(answers):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": a, "domain": "d"}
                              for i, a in enumerate(answers)])


def _upo_args(tmp_path, offline_rows=None, skip=False):
    offline = None
    if offline_rows is not None:
        offline = tmp_path / "offline.jsonl"
        offline.write_text("\n".join(json.dumps(row) for row in offline_rows))
    stage = SimpleNamespace(preflight=True, skip_bad_rows=skip, dataset_name="prompts.parquet")
    training = SimpleNamespace(rewards={"think_format": 0.5, "accuracy": 1.0},
                               upo_mode="both" if offline else "online", upo_offline_dataset=str(offline or ""))
    return stage, training


@pytest.mark.parametrize("rows, named", [
    ([{"question": "What is 2 + 2?", "answer": "4"}], "need a `prompt` column (text, or a list of {role, content} "
                                                       "messages) next to what the rewards read (e.g. `answer`); it "
                                                       "has: question, answer"),
    ([], "no prompts to train on"),
], ids=["question-column", "empty"])
def test_upo_gate_names_prompts_it_cannot_read(rows, named):
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "answer": []})
    with pytest.raises(UserError, match=re.escape(named)) as error:
        gates.check_prompt_rows(dataset, "qa.jsonl")
    assert "qa.jsonl" in str(error.value)
    gates.check_prompt_rows(_prompts(["4"]), "prompts.jsonl")  # prompt rows pass


def test_upo_gate_stops_prompts_whose_tools_grpo_would_not_render():
    """The stage dropped a `tools` column without a word (GRPO renders prompts without one): the model was asked to
    call tools whose schemas it never saw."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompts = _prompts(["a", "b"]).add_column("tools", [None, json.dumps(tools)])
    with pytest.raises(UserError, match=r"prompts.jsonl row 2 \(counting from 1\): its `tools` would be left out: "
                                        r"TRL's GRPO renders every prompt without"):
        gates.check_prompt_rows(prompts, "prompts.jsonl")
    gates.check_prompt_rows(_prompts(["a"]).add_column("tools", [None]), "prompts.jsonl")  # an empty column passes
    gates.check_prompt_rows(_prompts(["a", "b"]).add_column("tools", [None, ""]), "prompts.jsonl")  # and empty cells
    # an empty list as JSON text, which the SFT/DPO tools gate reads as no tools: no tools to lose (it was refused)
    empty = ["[]", " [] ", "[ ]", "null"]
    gates.check_prompt_rows(_prompts(list("abcd")).add_column("tools", empty), "prompts.jsonl")
    gates.check_tools_column(_prompts(list("abcd")).add_column("tools", empty), "prompts.jsonl")
    with pytest.raises(UserError, match=r"row 2 \(counting from 1\): its `tools` would be left out"):
        gates.check_prompt_rows(_prompts(["a", "b"]).add_column("tools", ["", "get_weather"]), "prompts.jsonl")


def test_upo_offline_pairs_with_tools_are_refused(tmp_path, tiny_tokenizer):
    """Offline pairs' prompts are rendered as the RL prompts are, without a `tools` column: it was dropped without a
    word, as the RL prompts' was before their gate. Refused by the pre-flight (naming the row) and by the trainer."""
    from posttrain.stages.upo_prompts import preflight_data
    from posttrain.trainers.upo_pairs import load_offline_pairs

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    stage, training = _upo_args(tmp_path, [_pair(0), {**_pair(1), "tools": json.dumps(tools)}])
    with pytest.raises(UserError, match=r"offline.jsonl \(train\) row 2 \(counting from 1\): its `tools` would be left"):
        preflight_data(_prompts(["1"]), stage, training)
    with pytest.raises(UserError, match=r"offline.jsonl: offline UPO pairs have a `tools` column; .* drop the column"):
        load_offline_pairs(training.upo_offline_dataset, tiny_tokenizer, 16)
    # an empty list as JSON text holds no tools: both pass it (the trainer refused what the pre-flight had passed)
    (tmp_path / "empty").mkdir()
    stage, training = _upo_args(tmp_path / "empty", [_pair(0), {**_pair(1), "tools": "[]"}])
    preflight_data(_prompts(["1"]), stage, training)
    assert len(load_offline_pairs(training.upo_offline_dataset, tiny_tokenizer, 16)) == 2


def test_upo_gate_stops_null_answers(tmp_path):
    from posttrain.stages.upo_prompts import preflight_data

    with pytest.raises(UserError, match=r"prompts.parquet row 3 \(counting from 1\): 'answer' is empty, so reward"):
        preflight_data(_prompts(["1", "2", None]), *_upo_args(tmp_path))


GSM8K_RATIONALE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
MATH_SOLUTION = ("The roots of $x^2 - 5x + 6$ are $2$ and $3$, since it factors as $(x-2)(x-3)$. Their product is "
                 "therefore $\\boxed{6}$.")


@pytest.mark.parametrize("reference", [GSM8K_RATIONALE, MATH_SOLUTION])
def test_upo_gate_stops_a_worked_solution_as_the_reference(tmp_path, reference):
    """GSM8K's raw `answer` (a rationale ending in `#### 72`) or a MATH solution passed every gate: compared with the
    whole text, a reply "72" scores 0 under exact_match and None (not scored) under numeric_accuracy. Refused, naming
    the row and the job that takes the answer out, with skip_bad_rows too (the column is wrong, not a row)."""
    from posttrain.rewards import exact_match, numeric_accuracy
    from posttrain.stages.upo_prompts import preflight_data

    reply = [[{"role": "assistant", "content": "The answer is 72." if "####" in reference else "It is 6."}]]
    assert exact_match(reply, answer=[reference]) == [0.0] and numeric_accuracy(reply, answer=[reference]) == [None]
    for skip in (False, True):
        with pytest.raises(UserError, match=r"prompts.parquet row 2 \(counting from 1\): 'answer' (holds GSM8K's "
                                            r"'####' marker|is a worked solution).*build_prompt_set"):
            preflight_data(_prompts(["4", reference]), *_upo_args(tmp_path, skip=skip))


@pytest.mark.parametrize("reference", ["x = 3", "\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", "$\\boxed{5}$", "1,000",
                                       "The capital of France is Paris, on the Seine.",
                                       "Since $2 + 3 = 5$, the answer is $\\boxed{5}$."])
def test_upo_gate_passes_real_references(tmp_path, reference):
    from posttrain.stages.upo_prompts import preflight_data

    prompts, _, record = preflight_data(_prompts([reference]), *_upo_args(tmp_path))
    assert prompts["answer"] == [reference] and record["prompts_skipped"] == 0


def test_upo_gate_finds_a_missing_reward_column(tmp_path):
    from posttrain.stages.upo_prompts import preflight_data

    prompts = _prompts(["1"]).remove_columns("answer")
    with pytest.raises(UserError, match=r"reward\(s\) accuracy need a 'answer' column; the rows have: prompt, domain"):
        preflight_data(prompts, *_upo_args(tmp_path))


def test_upo_gate_stops_identical_offline_pairs(tmp_path):
    from posttrain.stages.upo_prompts import preflight_data

    with pytest.raises(UserError, match=r"offline.jsonl \(train\) row 2 \(counting from 1\): chosen == rejected"):
        preflight_data(_prompts(["1"]), *_upo_args(tmp_path, [_pair(0), _pair(1, "x", "x")]))


def test_upo_gates_skip_and_count_with_skip_bad_rows(tmp_path):
    from posttrain.stages.upo_prompts import preflight_data

    stage, training = _upo_args(tmp_path, [_pair(0), _pair(1, "x", "x"), _pair(2)], skip=True)
    prompts, offline, record = preflight_data(_prompts(["1", "", "3"]), stage, training)
    assert prompts["answer"] == ["1", "3"] and len(offline) == 2
    assert record == {"prompts_skipped": 1, "offline_pairs_skipped": 1}


# ----------------------------------------------------------------------------------------------------------------------
# Through the real CLI: what reaches the terminal from a failing stage process
# ----------------------------------------------------------------------------------------------------------------------
def test_broken_stage_data_shows_the_cause_not_a_traceback(tmp_path, posttrain_here):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": TURNS}) + "\n" + json.dumps({"text": "no messages here"}) + "\n")
    raw = {"name": "broken", "base": {"model_name_or_path": "tiny:llama", "chat_template": "chatml"},
           "stages": {"sft": {"dataset_name": str(data), "max_steps": 1, "report_to": "none"}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = posttrain_here("run", tmp_path / "recipe.yaml", cwd=tmp_path, check=False)  # an exception would fail it
    shown = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2
    missing = 'row 2 (counting from 1): "messages" is missing'  # line 2 of the file
    assert f"step 'sft' failed: pre-flight: {data} {missing}" in shown
    log = tmp_path / "outputs" / "broken" / ".sft.partial" / "sft.log"
    assert f"Log: {log}" in shown
    assert "Traceback" not in shown and "CalledProcessError" not in shown
    assert shown.count(missing) == 2, shown  # the stage's own line, then the run's summary
    # one process runs without accelerate's launcher (`devices.direct_command`), so no launcher's traceback follows
    assert missing in log.read_text() and "CalledProcessError" not in log.read_text()
    state = json.loads((tmp_path / "outputs" / "broken" / "run.json").read_text())
    assert state["steps"]["run"]["status"] == "failed" and "row 2" in state["steps"]["sft"]["error"]


def test_data_help(posttrain_cli, tmp_path):
    result = posttrain_cli("data", "--help", cwd=tmp_path)
    assert "usage: posttrain data" in result.stdout and "build_verifiable_tasks" in result.stdout


def test_child_tracebacks_go_to_the_log_only(tmp_path, capsysbinary):
    """What a stage prints reaches the terminal, its tracebacks (its own, chained, the launcher's) only the log."""
    from posttrain.childproc import Outcome, _Echo, describe

    output = (b"step 1/3\r step 2/3\r\n[sft] pre-flight ok\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
              b"KeyError: 'a'\n\nDuring handling of the above exception, another exception occurred:\n\n"
              b"Traceback (most recent call last):\n  File \"y.py\", line 2\n    raise RuntimeError\nRuntimeError: boom\n"
              b"Traceback (most recent call last):\n  File \"launch.py\", line 9\nsubprocess.CalledProcessError: "
              b"Command died with <Signals.SIGKILL: 9>.\nbye\n")
    log_path = tmp_path / "sft.log"
    with open(log_path, "wb") as log:
        echo = _Echo(log, log_path)
        for start in range(0, len(output), 7):  # arbitrary chunk boundaries, as a pipe delivers them
            echo.feed(output[start:start + 7])
    shown = capsysbinary.readouterr().out.decode()
    assert log_path.read_bytes() == output
    assert "step 2/3" in shown and "[sft] pre-flight ok" in shown and "bye" in shown
    assert "Traceback" not in shown and "File " not in shown and "During handling" not in shown
    assert shown.count(f"(traceback written to {log_path})") == 1
    assert echo.last_exception == "RuntimeError: boom" and echo.signal == 9
    assert "RuntimeError: boom" in describe(Outcome(1, None, echo.last_exception))
    # a value only TRL checks (a DPO loss_type typo) ends a stage the same way: not called a bug alone
    assert "a recipe value posttrain does not check, or a bug" in describe(Outcome(1, None, "ValueError: Unknown loss"))
    assert "signal 9 (SIGKILL" in describe(Outcome(1, None, "ChildFailedError: ", 9))
    assert "signal 9 (SIGKILL" in describe(Outcome(-9, None, None))
    assert describe(Outcome(2, "pre-flight: data.jsonl row 3: ...", "x")) == "pre-flight: data.jsonl row 3: ..."


def test_the_launchers_copy_of_the_childs_output_stays_in_the_log(tmp_path, capsysbinary):
    """accelerate raises its CalledProcessError `from RuntimeError(<the child's stderr tail>)`: that copy of what the
    child already printed goes to the log only; a line that merely looks like its start is still shown."""
    from posttrain.childproc import _Echo

    child = b"Loading\r done\nerror: pre-flight: data.jsonl row 3: bad\n"
    launcher = (b"RuntimeError: Loading\r done\nerror: pre-flight: data.jsonl row 3: bad\n\n\nThe above exception was "
                b"the direct cause of the following exception:\n\nTraceback (most recent call last):\n  File \"launch.py\""
                b"\nsubprocess.CalledProcessError: Command '['python']' returned non-zero exit status 2.\n")
    lookalike = b"RuntimeError: not a cause, a line of output\nstill shown\n"
    for output, shown_lines in [(child + launcher, 1), (child + lookalike, 1)]:
        log_path = tmp_path / "stage.log"
        with open(log_path, "wb") as log:
            echo = _Echo(log, log_path)
            for start in range(0, len(output), 5):
                echo.feed(output[start:start + 5])
            echo.flush()
        shown = capsysbinary.readouterr().out.decode()
        assert log_path.read_bytes() == output
        assert shown.count("row 3: bad") == shown_lines, shown
        assert "RuntimeError" not in shown or output.endswith(lookalike)
    assert "not a cause, a line of output" in shown and "still shown" in shown


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("[!a]*/*.yaml")), ids=lambda p: p.stem)
def test_committed_recipes_name_only_existing_files(recipe, monkeypatch):
    from posttrain.recipe import load_recipe
    from posttrain.recipe_files import check_recipe_files

    monkeypatch.chdir(ROOT)
    check_recipe_files(load_recipe(recipe))


def test_run_checks_files_before_any_work(tmp_path, monkeypatch):
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    raw = _set("stages.upo.upo_offline_dataset", "prefs/missing.jsonl")(_tiny())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="stages.upo.upo_offline_dataset: file not found: prefs/missing.jsonl"):
        Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs").run()
    assert not (tmp_path / "outputs").exists(), "no data job, no base evaluation, nothing written"


def test_the_report_of_a_run_whose_data_job_failed_says_failed(tmp_path, monkeypatch):
    """The report written as the run ends is built after run.json says how it ended, not while it says running; it and
    run.json say why the job failed (its own error, which the terminal showed as it happened)."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "", "output": "x"}) + "\n")
    raw = _tiny()
    raw["data"]["extra"] = {"job": "build_sft_set", "sources": ["bad.jsonl"], "test_size": 0}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # the stage order is the file's
    with pytest.raises(UserError, match="data job 'build_sft_set' failed"):
        Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs").run()
    report = (tmp_path / "outputs" / "tiny-text" / "report.md").read_text()
    assert "run status **failed**" in report and "**Run failed:** data job 'build_sft_set' failed" in report
    cause = 'bad.jsonl:1: "instruction" is empty'
    assert cause in report and cause in json.loads((tmp_path / "outputs" / "tiny-text" / "run.json").read_text(
        ))["steps"]["run"]["error"]
    assert " · finished " in report


def test_an_adapter_no_step_changed_is_explained_not_a_crash(tiny_model_path, tmp_path, caplog):
    """A new adapter starts with every lora_B at zero; saved that way (e.g. UPO where every group's rollouts got the
    same reward) the stage stops with the likely causes, as a user error; a trained one passes. A continued adapter
    that comes out as it went in is warned about and recorded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.stages.adapter_checks import verify_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")),
                           LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "fresh")
    with pytest.raises(UserError, match="no training step changed the new adapter.*frac_reward_zero_std = 1"):
        verify_adapter(tmp_path / "fresh", model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.01)
    model.save_pretrained(tmp_path / "trained")
    assert "unchanged" not in verify_adapter(tmp_path / "trained", model)
    # continued from the stage before (UPO from DPO's adapter): its lora_B is not zero, so only a comparison with the
    # adapter it continued shows that no step changed it
    model.save_pretrained(tmp_path / "continued")
    with caplog.at_level("WARNING", logger="posttrain"):
        assert verify_adapter(tmp_path / "continued", model, continued=str(tmp_path / "trained"))["unchanged"]
    assert f"no training step changed the adapter continued from {tmp_path / 'trained'}" in caplog.text
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(0.01)
    model.save_pretrained(tmp_path / "continued")
    assert "unchanged" not in verify_adapter(tmp_path / "continued", model, continued=str(tmp_path / "trained"))
