"""`posttrain bench` and the speed defaults it measures: padding-free SFT batches, the defaults a recipe gets, the
CPU thread count a stage is launched with. The benchmark itself runs for one step on a tiny model, so it cannot rot;
it asserts nothing about speed."""

import json
import math

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


def test_speed_defaults_by_stage_and_size(tiny_model_path):
    path = tiny_model_path("llama")
    assert speed_defaults("sft", path) == {"gradient_checkpointing": False, "padding_free": True}
    assert speed_defaults("dpo", path) == {"gradient_checkpointing": False}  # no GPU here: no Liger
    assert speed_defaults("upo", None) == {"gradient_checkpointing": False}
    flags = accelerate_launch_args(None, 1)
    # the stage runs as many threads as a plain script would here (tests pin one)
    assert flags[flags.index("--num_cpu_threads_per_process") + 1] == str(torch.get_num_threads()) == "1"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_cpu_runs_it(native, monkeypatch, caplog, tiny_model_path, task_data):
    """`auto` precision and a recipe without `bf16` get bf16 only on a CPU with native bf16 (emulated, a matmul took
    90x as long as float32); a recipe that forces it on such a CPU keeps it, warned; the evaluation records what
    `auto` became."""
    from posttrain import devices
    from posttrain.evaluate import autocast, evaluate, load_rows
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


def test_bench_one_step_on_a_tiny_model(tmp_path, posttrain_cli):
    out = tmp_path / "bench.json"
    posttrain_cli("bench", "--model", "tiny:llama", "--steps", "1", "--repeats", "1", "--rl-steps", "1",
                  "--batch-size", "2", "--num-generations", "2", "--max-completion-length", "4", "--max-length", "128",
                  "--work", tmp_path / "work", "--out", out, cwd=tmp_path, timeout=600)
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
