"""`posttrain bench` and the speed defaults it measures: padding-free SFT batches, the defaults a recipe gets, the
CPU thread count a stage is launched with. The benchmark itself runs for one step on a tiny model, so it cannot rot;
it asserts nothing about speed."""

import json
import math
import time

import pytest
import torch

from posttrain.devices import accelerate_launch_args, speed_defaults
from posttrain.stages import sft


def _first_loss(trainer):
    return next(log["loss"] for log in trainer.state.log_history if "loss" in log)


@pytest.mark.parametrize("arch", ["llama", "ernie4_5_moe"])
def test_padding_free_sft_trains_on_the_same_loss(arch, tiny_model_path, task_data, sft_configs, tmp_path):
    """`padding_free` with `max_length` (which TRL refuses) flattens each batch after TRL truncated the rows: the
    first step's loss (LoRA B starts at zero, so it is the base model's) equals the padded batch's."""
    path = tiny_model_path(arch)
    padded = sft.main(*sft_configs(path, task_data, tmp_path / "padded", max_steps=1))
    flat = sft.main(*sft_configs(path, task_data, tmp_path / "flat", max_steps=1, padding_free=True))
    assert flat.data_collator.padding_free and not padded.data_collator.padding_free
    batch = flat.data_collator([flat.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert max(len(flat.train_dataset[i]["input_ids"]) for i in range(len(flat.train_dataset))) <= 192  # truncated
    assert math.isclose(_first_loss(flat), _first_loss(padded), rel_tol=1e-4)
    # on CPU the flat batches attend row by row; padded ones keep SDPA
    assert flat.model.get_base_model().config._attn_implementation == "packed_rows"
    assert padded.model.get_base_model().config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_row_by_row_attention_is_sdpa_per_row(arch, tiny_model_path):
    """`packed_rows` on a packed batch (float32: SDPA row by row) gives each row the logits it has alone, and the
    gradients of SDPA over the packed square with its block-diagonal mask; a padded batch (an attention mask) and
    generation go to SDPA as is."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.attention import register, row_bounds

    torch.manual_seed(0)
    rows = [torch.randint(5, 500, (n,)).tolist() for n in (7, 1, 12, 4)]
    ids = torch.tensor([sum(rows, [])])
    positions = torch.tensor([[p for row in rows for p in range(len(row))]])
    assert row_bounds(positions, ids.shape[1]) == [(0, 7), (7, 8), (8, 20), (20, 24)]
    assert row_bounds(torch.arange(24)[None], 24) is None and row_bounds(positions.expand(2, -1), 24) is None
    assert row_bounds(torch.tensor([[5, 6, 0, 1, 0]]), 5) is None  # a continuation: its first row did not start here
    models = {name: AutoModelForCausalLM.from_pretrained(tiny_model_path(arch), attn_implementation=name)
              for name in ("sdpa", register())}
    grads = {}
    for name, model in models.items():
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            alone = torch.cat([model(input_ids=torch.tensor([row]), use_cache=False).logits[0] for row in rows])
        torch.testing.assert_close(out.logits[0], alone, rtol=1e-5, atol=1e-5)
    assert grads["sdpa"].keys() == grads["packed_rows"].keys() and grads["sdpa"]
    for key, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["packed_rows"][key], grad, rtol=1e-4, atol=1e-6)
    padded = {"input_ids": torch.tensor([rows[0], rows[3] + [0] * 3]), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    with torch.no_grad():
        outs = [m(**padded).logits for m in models.values()]
        generated = [m.generate(**padded, max_new_tokens=3, do_sample=False) for m in models.values()]
    torch.testing.assert_close(outs[0], outs[1])
    assert torch.equal(generated[0], generated[1])


def test_speed_defaults_by_stage_and_size(tiny_model_path, monkeypatch):
    from posttrain import devices

    path = tiny_model_path("llama")
    assert speed_defaults("sft", path) == {"gradient_checkpointing": False, "padding_free": True}
    # no GPU here: no Liger, float32 base weights
    assert speed_defaults("dpo", path) == {"gradient_checkpointing": False, "padding_free": True}
    assert speed_defaults("upo", None) == {"gradient_checkpointing": False, "padding_free": True}
    # on a GPU with bf16: SFT's and DPO's base weights in bf16 unless the stage trains in fp16 or float32
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(devices, "gpu_memory_bytes", lambda: 80e9)
    monkeypatch.setattr(devices, "native_bf16", lambda device_type=None: device_type == "cuda")
    assert speed_defaults("sft", path)["dtype"] == "bfloat16" == speed_defaults("dpo", path, {"bf16": True})["dtype"]
    assert "dtype" not in speed_defaults("upo", path)  # its merged bf16 rollouts need a float32 base
    assert "dtype" not in speed_defaults("sft", path, {"bf16": False})
    assert "dtype" not in speed_defaults("dpo", path, {"bf16": False, "fp16": True})
    # modules trained in full stay in the base's dtype under PEFT: in bf16 they would drop small updates
    assert "dtype" not in speed_defaults("sft", path, {"lora_modules_to_save": ["multi_modal_projector"]})
    monkeypatch.setattr(devices, "native_bf16", lambda device_type=None: False)
    assert "dtype" not in speed_defaults("sft", path)
    monkeypatch.undo()
    flags = accelerate_launch_args(None, 1)
    # the stage runs as many threads as a plain script would here (tests pin one)
    assert flags[flags.index("--num_cpu_threads_per_process") + 1] == str(torch.get_num_threads()) == "1"


def test_device_defaults_for_fp16_training_and_for_cpu_processes(tiny_model_path, monkeypatch):
    """A recipe that trains in fp16 (bf16 left at TRL's default) gets no bf16 base weights. On CPU the stages run with
    `use_cpu` (several processes then train as one gloo job), each with its share of the threads a plain script
    would run."""
    from posttrain import devices

    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(devices, "gpu_memory_bytes", lambda: 80e9)
    monkeypatch.setattr(devices, "native_bf16", lambda device_type=None: True)
    assert "dtype" not in speed_defaults("sft", tiny_model_path("llama"), {"fp16": True})
    monkeypatch.setattr(devices, "has_cuda", lambda: False)
    assert devices.device_defaults({})["use_cpu"] is True
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert [devices.cpu_threads(n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]


def test_checkpointing_by_the_activations_of_a_step(tmp_path, monkeypatch):
    """Below 3B parameters gradient checkpointing stays off unless a step's activations at the recipe's lengths
    (every row at its longest) would take more than half the GPU: a 1.5B-shaped model gets it at 8 rows of 1,024 tokens
    on a 24 GB GPU, and on an 80 GB one only from longer rows, DPO's pairs counting twice. Never on CPU."""
    from posttrain import devices

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 1536, "num_hidden_layers": 28}')
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text('{"text_config": {"hidden_size": 1536, "num_hidden_layers": 28}}')

    def checkpointing(stage, args=None, path=model):
        return speed_defaults(stage, path, args)["gradient_checkpointing"]

    assert not checkpointing("sft", {"max_length": 65536})  # no GPU here
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(devices, "native_bf16", lambda device_type=None: True)
    monkeypatch.setattr(devices, "gpu_memory_bytes", lambda: 24e9)
    assert checkpointing("sft") and checkpointing("sft", path=vlm)  # TRL's 8 rows of 1,024 tokens: ~17 GB
    assert not checkpointing("sft", {"max_length": 512}) and not checkpointing("sft", path=tmp_path)  # no config
    monkeypatch.setattr(devices, "gpu_memory_bytes", lambda: 80e9)
    assert not checkpointing("sft") and checkpointing("sft", {"max_length": 4096})
    assert checkpointing("dpo", {"max_length": 2048}) and not checkpointing("sft", {"max_length": 2048})
    assert not checkpointing("upo", {"max_completion_length": 512})
    assert checkpointing("upo", {"per_device_train_batch_size": 32, "max_completion_length": 1024})
    # UPO's DPO term forwards the rejected rollouts and both sides of offline pairs for the same backward: 34 GB of
    # GRPO's rows alone, 47 GB with them
    assert not checkpointing("upo", {"per_device_train_batch_size": 16, "upo_lambda": 0})
    assert checkpointing("upo", {"per_device_train_batch_size": 16, "upo_mode": "both"})


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_cpu_runs_it(native, monkeypatch, caplog, tiny_model_path, task_data):
    """`auto` precision and a recipe without `bf16` get bf16 only on a CPU with native bf16 (emulated, a matmul took
    90x as long as float32); a recipe that forces it on such a CPU keeps it, warned; the evaluation records what
    `auto` became."""
    from posttrain import devices
    from posttrain.evaluate import evaluate, load_rows
    from posttrain.generation import autocast
    from posttrain.models import load_model, load_tokenizer

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
    expected = "bfloat16" if native else "float32"
    assert devices.resolve_precision("auto") == expected and devices.resolve_precision("float32") == "float32"
    assert devices.device_defaults({})["bf16"] is native and devices.device_defaults({"bf16": False})["bf16"] is False
    with caplog.at_level("WARNING", logger="posttrain.devices"):
        assert devices.device_defaults({"bf16": True})["bf16"] is True
    assert ("emulated" in caplog.text) is not native
    path = tiny_model_path("llama")
    model, tokenizer = load_model(path), load_tokenizer(path)
    with autocast(model, "auto"):
        assert torch.is_autocast_enabled("cpu") is native
    metrics = evaluate(model, tokenizer, load_rows(str(task_data), "test"), max_new_tokens=2, samples=0, dtype="auto")
    assert metrics["dtype"] == expected


def test_bench_one_step_on_a_tiny_model(tmp_path, posttrain_cli, capsys):
    out = tmp_path / "bench.json"
    # an earlier bench's runs in the same work folder (another model): `--from-runs` below must not mix them in
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "rl.runs.json").write_text('{"runs": [{"row": "sft", "model": "another"}]}')
    printed = posttrain_cli("bench", "--model", "tiny:llama", "--steps", "1", "--repeats", "1", "--rl-steps", "1",
                            "--batch-size", "2", "--num-generations", "2", "--max-completion-length", "4",
                            "--max-length", "128", "--no-warmup", "--work", tmp_path / "work", "--out", out,
                            cwd=tmp_path, timeout=600).stdout
    assert "[bench] 1/3 sft trl" in printed and "[bench] warm-up" not in printed  # a check that it runs: no warm-up
    result = json.loads(out.read_text())
    table = result["table"]
    assert list(table) == ["sft", "dpo", "grpo", "upo"]
    for row, columns in table.items():
        assert set(columns) == ({"equal", "defaults"} if row == "upo" else {"trl", "equal", "defaults"})
        for column in columns.values():
            assert column["tokens_per_s"] > 0 and column["peak_memory_gib"] > 0
        ratio = columns["equal"]["time_vs_trl" if row == "upo" else "vs_trl"]
        assert ratio["n"] == 1 and ratio["median"] > 0
    assert {run["tokens"] for run in result["runs"] if run["row"] == "sft"} != {0}
    markdown = out.with_suffix(".md").read_text()
    assert "| sft | trl |" in markdown and "| upo | defaults |" in markdown
    assert markdown.startswith("posttrain bench on CPU, 1 thread, no warm-up steps.")  # its times: one-time costs too
    # the same table from the workers' *.runs.json alone (what a cut-short bench leaves), the DPO worker's missing
    (tmp_path / "work" / "dpo.runs.json").unlink()
    again = tmp_path / "again.json"
    from posttrain.cli import main  # in this process: no training, so no second start of torch (seconds)

    assert main(["bench", "--from-runs", str(tmp_path / "work"), "--out", str(again)]) == 0
    rebuilt = json.loads(again.read_text())
    assert list(rebuilt["table"]) == ["sft", "grpo", "upo"] and rebuilt["device"] == result["device"]
    assert "another" not in json.dumps(rebuilt)
    for row, columns in rebuilt["table"].items():
        for name, column in columns.items():
            assert column["tokens_per_s"] == table[row][name]["tokens_per_s"]
    assert "| sft | trl |" in again.with_suffix(".md").read_text()
    assert main(["bench", "--from-runs", str(tmp_path), "--out", str(again)]) == 2
    assert "no *.runs.json" in capsys.readouterr().out


def test_each_column_is_warmed_up_by_one_unrecorded_step_unless_asked_not_to(tmp_path, monkeypatch):
    """One step of each (row, column) and the first run once in full, unrecorded, before the recorded runs; none
    with `--no-warmup`."""
    from posttrain import bench_runs, bench_summary, devices

    calls = []

    def measure(row, run):
        calls.append((row, run["column"], run["args"]["max_steps"]))
        return {"train_runtime_s": 1.0, "tokens": 1, "peak_memory_bytes": 1}

    monkeypatch.setattr(bench_runs, "measure", measure)
    monkeypatch.setattr(bench_summary, "device_name", lambda: ("CPU", None))
    monkeypatch.setattr(devices, "parameter_count", lambda model: 1)
    runs = [{"row": "sft", "column": column, "repeat": 0, "args": {"max_steps": 3, "model_name_or_path": "m"}}
            for column in ("trl", "equal", "trl")]
    for warmup, before in ((True, [("sft", "trl", 1), ("sft", "equal", 1), ("sft", "trl", 3)]), (False, [])):
        calls.clear()
        (tmp_path / "spec.json").write_text(json.dumps({"threads": 1, "runs": runs, "warmup": warmup}))
        assert bench_runs.main([str(tmp_path / "spec.json"), str(tmp_path / "out.json")]) == 0
        assert calls == before + [("sft", "trl", 3), ("sft", "equal", 3), ("sft", "trl", 3)]
        assert len(json.loads((tmp_path / "out.json").read_text())["runs"]) == 3


def test_a_variant_column_is_our_defaults_with_its_arguments_over_them(tmp_path):
    """`--variant NAME:KEY=VALUE,...` adds a column to every row's repeats: the `defaults` column's arguments with the
    variant's over them (values read as YAML scalars); malformed text or a taken name is refused."""
    from posttrain.bench import BenchOptions, parse_variant, plan_runs
    from posttrain.errors import UserError

    name, extra = parse_variant("fast:optim=adamw_torch_fused, torch_compile=true,learning_rate=0.0001")
    assert name == "fast" and extra == {"optim": "adamw_torch_fused", "torch_compile": True, "learning_rate": 1e-4}
    inputs = {"model": str(tmp_path), "tokenizer": str(tmp_path), "data": str(tmp_path), "adapter": str(tmp_path)}
    options = BenchOptions(stages=("sft",), repeats=2, variants={name: extra})
    runs = plan_runs(["sft"], inputs, options, tmp_path)
    assert [run["column"] for run in runs] == ["trl", "equal", "defaults", "fast", "fast", "defaults", "equal", "trl"]
    defaults, fast = (next(run["args"] for run in runs if run["column"] == c) for c in ("defaults", "fast"))
    assert {k: v for k, v in fast.items() if k not in {*extra, "output_dir"}} == \
        {k: v for k, v in defaults.items() if k not in {*extra, "output_dir"}}
    assert fast["learning_rate"] == 1e-4 and defaults["learning_rate"] != 1e-4 and "padding_free" in fast
    for bad in ("fast", "fast:", "fast:optim", ":optim=x", "defaults:optim=x"):
        with pytest.raises(UserError, match="--variant"):
            parse_variant(bad)


def test_plain_arguments_go_to_the_plain_script_and_the_equal_column_alike(tmp_path):
    """`--plain KEY=VALUE,...` (e.g. `bf16=false` where the CPU emulates bf16): over TRL's defaults on both sides of the
    equal-arguments comparison, not in our defaults' column."""
    from posttrain.bench import BenchOptions, parse_arguments, plan_runs
    from posttrain.errors import UserError

    plain = parse_arguments("bf16=false, gradient_checkpointing=false", "expected")
    inputs = {"model": str(tmp_path), "tokenizer": str(tmp_path), "data": str(tmp_path), "adapter": str(tmp_path)}
    runs = plan_runs(["sft"], inputs, BenchOptions(stages=("sft",), repeats=1, plain=plain), tmp_path)
    args = {run["column"]: run["args"] for run in runs}
    assert args["trl"]["bf16"] is False and args["equal"]["bf16"] is False
    assert args["trl"]["gradient_checkpointing"] is False and args["equal"]["gradient_checkpointing"] is False
    unchanged = plan_runs(["sft"], inputs, BenchOptions(stages=("sft",), repeats=1), tmp_path)
    assert args["defaults"] == next(run["args"] for run in unchanged if run["column"] == "defaults")
    assert next(run["args"] for run in unchanged if run["column"] == "trl")["bf16"] is True  # TRL's own default
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_arguments("bf16", "expected KEY=VALUE")


def test_the_upo_row_says_whether_its_dpo_term_ran():
    """A `upo` run that mined no pair timed GRPO alone: the table says so. The bench's rewards tell random-weight
    rollouts of one length apart (their words), so its `upo` row has pairs on `tiny:` and `shape:` models too."""
    from posttrain.bench import REWARDS
    from posttrain.bench_summary import markdown_table, summarize
    from posttrain.rewards import REWARDS as FUNCTIONS

    run = {"repeat": 0, "train_runtime_s": 1.0, "steps": 1, "tokens": 10, "peak_memory_bytes": 1, "memory_kind": "rss"}
    runs = [{**run, "row": "grpo", "column": "trl"}, {**run, "row": "upo", "column": "equal", "upo_pairs": 0.0},
            {**run, "row": "upo", "column": "defaults", "upo_pairs": 1.5}]
    table = summarize(runs, 0, None)
    assert table["upo"]["equal"]["upo_pairs"] == 0 and table["upo"]["defaults"]["upo_pairs"] == 1.5
    markdown = markdown_table(table, "CPU")
    assert markdown.count("no pairs: DPO term not run") == 1 and "| upo | equal |" in markdown
    rollouts = ["ab cd ef gh", "abcdef gh"]  # one prompt's rollouts of a random model: wrong, unformatted alike
    columns = {"answer": ["7", "7"], "thinking": [True, True]}
    rewards = [sum(weight * FUNCTIONS[name]([text], **{k: v[:1] for k, v in columns.items()})[0]
                   for name, weight in REWARDS.items()) for text in rollouts]
    assert rewards[0] != rewards[1]


def test_cpu_seconds_cover_the_span_train_runtime_times(monkeypatch):
    """The per-CPU-second ratio times what the wall-clock one does: `train_runtime` starts after `train()`'s setup
    (dataloader, optimizer, accelerate's prepare), so the CPU seconds do too."""
    from transformers import Trainer

    from posttrain.bench_runs import TrainCpuTime

    def spin(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    def train(trainer):  # Trainer.train's shape: setup, then the callbacks around the timed loop
        spin(0.3)
        for callback in trainer.callbacks:
            callback.on_train_begin(None, None, None)
        spin(0.1)
        for callback in trainer.callbacks:
            callback.on_train_end(None, None, None)

    class Fake:
        callbacks = []

        def add_callback(self, callback):
            self.callbacks.append(callback)

    monkeypatch.setattr(Trainer, "train", train)
    with TrainCpuTime() as cpu:
        Trainer.train(Fake())
    assert 0.09 <= cpu.seconds < 0.2


def test_equal_arguments_are_grpos_for_the_rl_rows(tmp_path):
    """UPOConfig turns dropout off and samples rollouts from merged copies by default; plain GRPO does neither, so the
    `trl` and `equal` columns of the GRPO and UPO rows write GRPO's behaviour out and only `defaults` gets ours."""
    from posttrain.bench import BenchOptions, plan_runs

    inputs = {"model": str(tmp_path), "tokenizer": str(tmp_path), "data": str(tmp_path), "adapter": str(tmp_path)}
    runs = plan_runs(["grpo", "upo"], inputs, BenchOptions(stages=("grpo", "upo"), repeats=1), tmp_path)
    for run in runs:
        ours = run["column"] == "defaults"
        assert ("merged_rollouts" in run["args"], "disable_dropout" in run["args"]) == (not ours, not ours), run
        if not ours:
            assert run["args"]["merged_rollouts"] is False and run["args"]["disable_dropout"] is False


def test_the_upo_row_alone_still_runs_its_plain_grpo_reference(tmp_path):
    """`--stages upo`: the row's time and memory are over plain GRPO's step, so that run is planned too (once per
    repeat, its ratios taken) even without the `grpo` row."""
    from posttrain.bench import BenchOptions, plan_runs
    from posttrain.bench_summary import summarize

    inputs = {"model": str(tmp_path), "tokenizer": str(tmp_path), "data": str(tmp_path), "adapter": str(tmp_path)}
    runs = plan_runs(["upo"], inputs, BenchOptions(stages=("upo",), rl_repeats=2), tmp_path)
    assert [(run["row"], run["column"]) for run in runs] == [
        ("grpo", "trl"), ("upo", "equal"), ("upo", "defaults"), ("upo", "defaults"), ("upo", "equal"), ("grpo", "trl")]
    measured = [{"row": run["row"], "column": run["column"], "repeat": run["repeat"], "steps": 2, "tokens": 100,
                 "train_runtime_s": 2.0 if run["side"] == "trl" else 3.0, "peak_memory_bytes": 1, "memory_kind": "rss"}
                for run in runs]
    assert summarize(measured, 0, None)["upo"]["equal"]["time_vs_trl"] == {"median": 1.5, "min": 1.5, "max": 1.5, "n": 2}


def test_the_plain_script_loads_the_model_as_the_stage_does(tiny_model_path):
    """`--plain dtype=bfloat16,attn_implementation=eager` reaches the plain script's model load, not only the equal
    column's stage."""
    import torch
    from trl import ModelConfig

    from posttrain.bench_runs import plain_model

    path = tiny_model_path("llama")
    model = plain_model(ModelConfig(model_name_or_path=path, dtype="bfloat16", attn_implementation="eager"), {})
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert next(plain_model(ModelConfig(model_name_or_path=path), {}).parameters()).dtype == torch.float32


def test_the_starting_adapter_is_made_again_for_another_model(tmp_path, tiny_model_path):
    """A --work folder that served a bench of another model (`outputs/bench` by default) holds that model's starting
    adapter: DPO and UPO continue one made for this model, not the other one's (of another shape, it does not load)."""
    import shutil

    from posttrain.bench_inputs import starting_adapter

    other = shutil.copytree(tiny_model_path("llama"), tmp_path / "other")  # another model, as the bench tells them
    for model in (tiny_model_path("llama"), other, other):
        adapter = starting_adapter(model, tmp_path / "adapter")
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model)


def test_bench_chat_data_is_real_conversations_that_fit(tmp_path, tiny_model_path, task_data):
    """`--data chat`: SFT rows are the shipped human conversations whose first reply ends within `max_length` (the
    stage's pre-flight refuses a row whose end-of-turn token is cut off: at `--max-length 128` the whole SFT row
    failed), DPO pairs the preference dialogues whose prompt and either reply fit in `max_length` whole (the stages
    refuse the others), both rendered without thinking; the RL prompts stay the tasks'."""
    import pandas as pd

    from posttrain.bench_inputs import write_bench_data
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path("llama"), "chatml")
    write_bench_data(task_data, tmp_path, tokenizer, "chat", max_length=256)
    sft, pairs, prompts = (pd.read_parquet(tmp_path / name / "train.parquet") for name in ("sft", "pairs", "prompts"))
    assert 0 < len(sft) < 300 and all(len(messages) >= 2 for messages in sft["messages"])
    for messages in sft["messages"]:
        first_reply = list(messages[:next(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1])
        text = tokenizer.apply_chat_template(first_reply, tokenize=False, enable_thinking=False)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 256
    assert 0 < len(pairs) < 221  # some dialogues are longer than 256 tokens
    for _, row in pairs.iterrows():
        assert not row["chat_template_kwargs"]["enable_thinking"]
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template([*row["prompt"], *row[side]], tokenize=False, enable_thinking=False)
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 256
    assert set(prompts.columns) >= {"prompt", "answer", "domain"}


def test_stage_configs_do_not_warn_about_names_the_user_did_not_choose(tmp_path):
    """TRL's configs default the deprecated `gradient_checkpointing`: posttrain silences that FutureWarning (and
    PEFT's `is_gradient_checkpointing` one) and no other."""
    import warnings

    from trl import SFTConfig

    from posttrain import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
        assert any("`gradient_checkpointing` is deprecated" in str(w.message) for w in caught)  # what it silences
        caught.clear()
        quiet_known_warnings()
        SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another deprecation"]


def test_packed_rows_attend_as_one_padded_batch_under_autocast(tiny_model_path, monkeypatch):
    """Under bf16 autocast `packed_rows` computes the rows as one padded batch (`padded_rows`), in float32 SDPA row by
    row; the padded batch gives each row's SDPA output and gradients, with grouped-query heads and rows of 1 token."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from posttrain.models import attention

    torch.manual_seed(0)
    bounds = [(0, 7), (7, 8), (8, 20), (20, 24)]
    query, key, value = (torch.randn(1, heads, 24, 8, requires_grad=True) for heads in (4, 2, 2))
    alone = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                      is_causal=True, enable_gqa=True).transpose(1, 2)
                       for s, e in bounds], dim=1)
    weights = torch.randn_like(alone)
    expected = torch.autograd.grad((alone * weights).sum(), (query, key, value))
    # `padded_rows_sdpa` (what CUDA gets: SDPA over the padded rows, causal, no mask) computes the same on any device
    rows = attention.PackedRows.from_bounds(bounds, 24, "cpu")
    assert rows.longest == 12 and rows.real.sum() == 24
    for function in (attention.padded_rows, attention.padded_rows_sdpa):
        padded = function(query, key, value, rows, None, 0.0)
        torch.testing.assert_close(padded, alone)
        for ours, theirs in zip(torch.autograd.grad((padded * weights).sum(), (query, key, value)), expected,
                                strict=True):
            torch.testing.assert_close(ours, theirs)

    calls = []
    padded_rows = attention.padded_rows
    monkeypatch.setattr(attention, "padded_rows", lambda *args: calls.append(1) or padded_rows(*args))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), attn_implementation=attention.register())
    ids = torch.randint(5, 500, (1, 24))
    positions = torch.tensor([[p for s, e in bounds for p in range(e - s)]])
    model(input_ids=ids, position_ids=positions, use_cache=False)
    assert not calls  # float32: SDPA per row
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=positions, use_cache=False).logits.float().sum().backward()
    assert len(calls) == model.config.num_hidden_layers
    # a sliding-window layer whose window a row outgrows keeps SDPA and its sliding mask
    module = model.model.layers[0].self_attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.packed_rows_forward(module, query, key, value, None, positions, sliding_window=4)
        assert len(calls) == model.config.num_hidden_layers
        attention.packed_rows_forward(module, query, key, value, None, positions, sliding_window=12)
        assert len(calls) == model.config.num_hidden_layers + 1
        # a position bias (one tensor over the packed sequence's square) keeps SDPA, which adds it to the scores
        bias = torch.randn(1, 4, 24, 24)
        out = attention.packed_rows_forward(module, query, key, value, None, positions, position_bias=bias)[0]
        assert len(calls) == model.config.num_hidden_layers + 1
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    scores = (query @ key.repeat_interleave(2, dim=1).transpose(-1, -2)) * 8 ** -0.5 + bias
    reference = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value.repeat_interleave(2, dim=1))
    torch.testing.assert_close(out.float(), reference.transpose(1, 2), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", ["qwen2_moe", "phimoe"])
def test_packed_rows_keep_a_window_only_the_module_and_mask_know(family):
    """Qwen2-MoE's and PhiMoE's sliding-window layers pass no `sliding_window` to the attention function: the window is
    in SDPA's mask and on the module (Qwen2-MoE) or in the config alone (PhiMoE). A packed row longer than it attends
    as SDPA does (the window kept), not over the whole row."""
    from transformers import AutoModelForCausalLM, PhimoeConfig, Qwen2MoeConfig

    from posttrain.models.attention import register

    if family == "qwen2_moe":
        config = Qwen2MoeConfig(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                use_sliding_window=True, sliding_window=4, max_window_layers=1)
        assert config.layer_types == ["sliding_attention"]
    else:
        config = PhimoeConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                              sliding_window=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    rows = [torch.randint(5, 500, (n,)).tolist() for n in (9, 3, 12)]
    ids = torch.tensor([sum(rows, [])])
    positions = torch.tensor([[p for row in rows for p in range(len(row))]])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([row]), use_cache=False).logits[0] for row in rows])
        model.set_attn_implementation(register())
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_packed_layout_is_read_once_per_batch(tiny_model_path, monkeypatch):
    """The rows of a packed batch are read off its position ids once per forward (a host sync on a GPU), not once per
    layer, and a later batch, even one of the same length or the same tensor changed in place, gets its own rows."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import attention

    reads = []
    row_bounds = attention.row_bounds
    monkeypatch.setattr(attention, "row_bounds", lambda *args: reads.append(1) or row_bounds(*args))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), attn_implementation=attention.register())
    assert model.config.num_hidden_layers > 1
    torch.manual_seed(0)
    for lengths in ((7, 1, 12, 4), (4, 12, 8), (10, 14)):  # the same 24 tokens, split differently
        rows = [torch.randint(5, 500, (n,)).tolist() for n in lengths]
        ids = torch.tensor([sum(rows, [])])
        positions = torch.tensor([[p for row in rows for p in range(len(row))]])
        reads.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
            alone = torch.cat([model(input_ids=torch.tensor([row]), use_cache=False).logits[0] for row in rows])
        assert len(reads) == 1 + len(rows)  # the packed forward once, then each row alone (not packed: no layout)
        torch.testing.assert_close(packed.float(), alone.float(), rtol=0.05, atol=0.05)
    reads.clear()
    positions[0, 10:] = torch.arange(14)  # in place: the rows are now 10 and 14 tokens, whatever the cache held
    first = attention.packed_layout(positions, 24)
    positions[0, 10:] = torch.arange(10, 24)
    second = attention.packed_layout(positions, 24)
    assert first.bounds == [(0, 10), (10, 24)] and second is None  # one row: not packed
    assert attention.packed_layout(positions, 24) is second and len(reads) == 2  # the last one cached
    with torch.inference_mode():  # no version counter to see in-place changes by: read every time
        positions = torch.tensor([[p for n in (10, 14) for p in range(n)]])
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]  # one read per layer here
        assert len(reads) == 2 + model.config.num_hidden_layers
        torch.testing.assert_close(packed[10:], model(input_ids=ids[:, 10:], use_cache=False).logits[0])
        positions[0, 10:] = torch.arange(10, 24)
        assert attention.packed_layout(positions, 24) is None


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_lm_head_matches_trls_function(bf16, monkeypatch):
    """`CpuLogProb` returns what TRL's `ChunkedLogProbFunction` returns (log-probs, entropy, sum of squared probs, mean
    logit, top-1) with the same gradients for the hidden states, the head's weight and bias, through the log-probs
    and the entropy; in one chunk (logits kept) and in several (projected again); soft-capping goes to TRL's."""
    from trl.kernels import ChunkedLogProbFunction

    from posttrain.models import lm_head

    torch.manual_seed(0)
    positions, hidden_size, vocab = 40, 16, 300
    hidden = torch.randn(positions, hidden_size)
    weight, bias = torch.randn(vocab, hidden_size) / 3, torch.randn(vocab)  # logits of a few units, as in a model
    targets = torch.randint(0, vocab, (positions,))
    targets[0] = torch.mm(hidden[:1], weight.t()).add(bias).argmax()  # at least one right top-1
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    weights = torch.rand(positions)

    def run(function, chunk_elements):
        monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", chunk_elements)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = function(*leaves, targets, 0.7, 128, None, 2.0, outputs)
        ((out[0] * weights).sum() - 0.3 * out[1].sum()).backward()
        return [x.detach() for x in out], [leaf.grad for leaf in leaves]

    trl_out, trl_grads = run(ChunkedLogProbFunction.apply, lm_head.CHUNK_ELEMENTS)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-4, "atol": 1e-5}
    for chunk_elements in (lm_head.CHUNK_ELEMENTS, 7 * vocab):  # one chunk; six chunks of 7 positions
        out, grads = run(lm_head.apply, chunk_elements)
        assert torch.equal(out[4], trl_out[4]) and out[4].any()
        for ours, theirs in zip(out[:4] + grads, trl_out[:4] + trl_grads, strict=True):
            torch.testing.assert_close(ours, theirs, **tolerance)
    softcapped = [lm_head.apply(hidden, weight, bias, targets, 1.0, 128, 5.0, 1.0, outputs),
                  ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 128, 5.0, 1.0, outputs)]
    assert all(torch.equal(a, b) for a, b in zip(*softcapped, strict=True))


def test_cpu_lm_head_backward_uses_the_forwards_probabilities_once(monkeypatch):
    """With one chunk the backward turns the forward's probabilities into the logits' gradient in place, without
    projecting again; a second backward through the same graph finds them used up, projects again and gets the same
    gradient."""
    from posttrain.models import lm_head

    projections = []
    project = lm_head.project
    monkeypatch.setattr(lm_head, "project", lambda *args: projections.append(1) or project(*args))
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, requires_grad=True)
    weight, targets = torch.randn(50, 16) / 3, torch.randint(0, 50, (8,))
    log_probs, *_ = lm_head.CpuLogProb.apply(hidden, weight, None, targets, 1.0, 0, None, 1.0, ())
    assert len(projections) == 1
    log_probs.sum().backward(retain_graph=True)
    assert len(projections) == 1
    first = hidden.grad.clone()
    log_probs.sum().backward()
    assert len(projections) == 2
    torch.testing.assert_close(hidden.grad, 2 * first)


def test_lora_inputs_stay_in_autocast_dtype_with_the_same_values(tiny_model_path):
    """Under bf16 autocast `lora_inputs_uncast` drops PEFT's float32 round trip of the LoRA inputs: fewer copies, the
    same loss and LoRA gradients bit for bit; outside autocast a bf16 base with float32 adapters still casts."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from posttrain.models import precision

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.copies += func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(5, 500, (2, 12))

    def step():
        model.zero_grad()
        with CountCopies() as counted, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, counted.copies

    loss, grads, copies = step()
    with precision.lora_inputs_uncast(model):
        loss_uncast, grads_uncast, copies_uncast = step()
    assert torch.equal(loss, loss_uncast)
    assert grads.keys() == grads_uncast.keys() and all(torch.equal(grads[n], grads_uncast[n]) for n in grads)
    assert copies_uncast < copies
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))

    model.get_base_model().to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    with precision.lora_inputs_uncast(model), torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()  # no autocast: PEFT's cast is what makes this run


def test_lora_update_inside_the_matmul_gives_peft_s_outputs_and_gradients(tiny_model_path):
    """`fused_lora.update_in_matmul`: in float32 on CPU each LoRA layer runs one in-place `addmm_` into its base output
    (no out-of-place `addmm`, which copies that output first) and no [tokens, features] product by its scaling, with PEFT's loss and gradients to float32 rounding; under bf16 autocast, with the adapter
    disabled and after the block, PEFT's own forward runs, bit for bit."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from posttrain.models import fused_lora

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.addmm = self.addmm_ = self.scaled = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.addmm += func is torch.ops.aten.addmm.default
            self.addmm_ += func is torch.ops.aten.addmm_.default
            self.scaled += func is torch.ops.aten.mul.Tensor and not torch.is_tensor(args[1])  # `* scaling`
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")),
                           LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", init_lora_weights=False))
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    ids = torch.randint(5, 500, (2, 12))

    def step(autocast=False):
        model.zero_grad()
        with CountOps() as counted, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, counted

    loss, grads, peft_ops = step()
    with fused_lora.update_in_matmul(model):
        fused_loss, fused_grads, fused_ops = step()
        bf16 = step(autocast=True)
        with model.disable_adapter(), torch.no_grad():
            base_logits = model(input_ids=ids).logits
    assert peft_ops.addmm == peft_ops.addmm_ == 0 and peft_ops.scaled >= 2 * layers  # forward and backward scale
    assert fused_ops.addmm_ == layers and fused_ops.addmm == 0 and fused_ops.scaled < peft_ops.scaled - layers
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == grads.keys() and all(grads[n].abs().sum() > 0 for n in grads)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    peft_bf16 = step(autocast=True)
    assert bf16[2].addmm == peft_bf16[2].addmm and torch.equal(bf16[0], peft_bf16[0])
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(base_logits, model(input_ids=ids).logits)
    assert not any("forward" in vars(m) for m in model.modules())


def test_dropout_turned_off_by_trl_keeps_the_fast_lora_paths(tiny_model_path):
    """An adapter trained with dropout (PEFT's default 0.05), continued in DPO or UPO: TRL's `disable_dropout` sets
    its Dropout's p to 0 rather than replacing it, and such a layer takes the fused path like one without dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import fused_lora
    from posttrain.models.precision import no_dropout

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")),
                           LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    x = torch.randn(1, 3, layer.in_features)
    assert not fused_lora._fused(layer, x, (), {})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # what trl.trainer.utils.disable_dropout_in_model does
    assert no_dropout(layer.lora_dropout["default"]) and fused_lora._fused(layer, x, (), {})


def test_lora_layers_with_hooks_or_variants_keep_peft_s_forward(tiny_model_path):
    """A LoRA layer whose base layer runs a hook (accelerate's offloading, say) is left to PEFT: the fused path reads
    the base weight directly and would skip it. So is a LoRA variant (DoRA)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import fused_lora

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "base_layer")]
    calls = []
    layers[0].base_layer.register_forward_hook(lambda *args: calls.append(1))
    with fused_lora.update_in_matmul(model), torch.no_grad():
        model(input_ids=torch.randint(5, 500, (1, 6)))
        fused = [m for m in layers if "forward" in vars(m)]
    assert calls == [1] and layers[0] not in fused and len(fused) == len(layers) - 1

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")),
                          LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False))
    ids = torch.randint(5, 500, (1, 6))
    with torch.no_grad():
        for name, param in dora.named_parameters():
            if "lora_magnitude_vector" in name:  # at its init DoRA equals LoRA: move it away from there
                param.mul_(torch.rand_like(param) + 0.5)
        expected = dora(input_ids=ids).logits
        with fused_lora.update_in_matmul(dora):  # DoRA is a LoRA variant: PEFT computes it, bit for bit
            assert torch.equal(dora(input_ids=ids).logits, expected)


def test_an_interrupted_bench_says_how_to_keep_its_finished_runs(tmp_path, monkeypatch, capsys):
    """The same command again starts over and deletes the finished runs: Ctrl-C says `--from-runs` keeps them."""
    from posttrain import bench

    def worker(plans, threads, work, name, warmup):
        (work / "sft.runs.json").write_text(json.dumps({"runs": [{}, {}]}))  # the SFT row's runs, finished
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "resolve_bench_model", lambda model, work: work)
    monkeypatch.setattr(bench, "prepare_inputs", lambda model, work, options: {})
    monkeypatch.setattr(bench, "plan_runs", lambda *args: [])
    monkeypatch.setattr(bench, "run_worker", worker)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(bench.BenchOptions(work=str(tmp_path / "work"), out=str(tmp_path / "bench.json")))
    shown = " ".join(capsys.readouterr().out.split())
    assert f"2 finished runs are in {tmp_path / 'work'}: `posttrain bench --from-runs {tmp_path / 'work'}`" in shown
    assert not (tmp_path / "bench.json").exists()


def test_bench_without_a_row_writes_nothing(tmp_path, capsys):
    """`--stages ","` (an empty variable) ran nothing and replaced bench.json with an empty table."""
    from posttrain.cli import main

    (tmp_path / "bench.json").write_text("{}")
    assert main(["bench", "--stages", ",", "--out", str(tmp_path / "bench.json")]) == 2
    assert "--stages: no row given; choose from sft, dpo, grpo, upo" in capsys.readouterr().out
    assert (tmp_path / "bench.json").read_text() == "{}"
