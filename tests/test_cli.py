"""The CLI as a user meets it: every verb has --help, doctor reports, data jobs are listed."""

import subprocess
import sys
from pathlib import Path

import pytest

VERBS = ["run", "eval", "report", "data", "export", "chat", "doctor", "ablate"]


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    result = cli(verb, "--help") if verb != "data" else cli("data", "list")
    assert "usage" in result.stdout.lower() or "data jobs:" in result.stdout


def test_data_lists_jobs_and_job_help():
    listed = cli("data", "list").stdout
    for job in ("build_verifiable_tasks", "build_sft_set", "build_preference_set", "build_onpolicy_pairs"):
        assert job in listed
    assert "--n_train" in cli("data", "build_verifiable_tasks", "--help").stdout


def test_doctor_reports_stack_and_default_model():
    from posttrain.doctor import check_default_model, check_versions

    result = cli("doctor", check=False)
    assert result.returncode == 0 and "all good" in result.stdout, result.stdout  # a set-up stack has no problem
    for name in ("trl", "transformers", "peft", "torch build", "default model", "offline mode"):
        assert name in result.stdout
    assert all(status == "ok" for _, _, status in check_versions()), check_versions()
    assert check_default_model()[0][2].startswith("installed")


def test_doctor_measures_what_emulated_bf16_costs_here(monkeypatch):
    """On a CPU without bf16 instructions doctor says what a bf16 matmul costs on this machine (4x to 90x on the CPUs
    measured), not a figure from another one."""
    from posttrain import doctor
    from posttrain.devices import bf16_matmul_slowdown

    monkeypatch.setattr(doctor, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(doctor, "bf16_matmul_slowdown", lambda: 4.57)
    (row,) = [row for row in doctor.check_device() if row[0] == "cpu bf16"]
    assert row[1] == "emulated" and "a bf16 matmul takes 4.6x as long here" in row[2]
    assert bf16_matmul_slowdown(repeats=1) > 0  # a real measurement of two timed matmuls


def test_unknown_data_job_is_a_user_error():
    result = cli("data", "build_nothing", check=False)
    assert result.returncode == 2 and "is not a data_prep job" in result.stdout


def test_overrides_after_flags(tmp_path, capsys):
    """`posttrain run RECIPE --only upo key=value`: an override after the flags counts like one before them. (The
    dry run in-process: a subprocess would spend its time importing TRL to check the keys.)"""
    from posttrain.cli import main

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml")
    assert main(["run", recipe, "--only", "upo", "stages.upo.upo_lambda=0.25", "--dry-run", "stages.sft.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    assert "upo_lambda: 0.25" in printed and "max_steps: 7" in printed, printed
    result = cli("run", recipe, "--dry-run", "--bogus-flag", check=False)
    assert result.returncode == 2 and "unrecognized arguments: --bogus-flag" in result.stderr


def test_until_names_a_stage_of_the_recipe(tmp_path, capsys):
    """`posttrain run --until STAGE` is checked before any data job or stage runs."""
    from posttrain.cli import main

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml")
    assert main(["run", recipe, "--until", "ppo", "--output-dir", str(tmp_path)]) == 2
    assert "--until: stage 'ppo' is not in recipe" in capsys.readouterr().out
    assert not (tmp_path / "tiny-text" / "data").exists() and not (tmp_path / "tiny-text" / "base").exists()


def test_eval_of_a_run_stage_reproduces_the_runs_own_evaluation(tiny_run, tmp_path):
    """`posttrain eval RUN --stage S` evaluates as the run did (its recipe's eval: budget, batch, samples), so it gives
    the verdicts the run recorded; a flag given on the command line wins over the run's setting."""
    import json

    from posttrain import cli as posttrain_cli

    recorded = json.loads((tiny_run / "sft" / "metrics.json").read_text())["eval"]
    assert posttrain_cli.main(["eval", str(tiny_run), "--stage", "sft", "--out", str(tmp_path / "same.json")]) == 0
    again = json.loads((tmp_path / "same.json").read_text())
    assert again["verdicts"] == recorded["verdicts"] and again["prompts_sha"] == recorded["prompts_sha"]
    assert len(again["samples"]) == len(recorded["samples"]) == 4  # the tiny recipe's eval.samples, not the flag's 8
    assert again["mean_completion_tokens"] == pytest.approx(recorded["mean_completion_tokens"])
    assert posttrain_cli.main(["eval", str(tiny_run), "--stage", "sft", "--max-new-tokens", "2", "--samples", "1",
                               "--out", str(tmp_path / "short.json")]) == 0
    short = json.loads((tmp_path / "short.json").read_text())
    assert short["mean_completion_tokens"] <= 2 < recorded["mean_completion_tokens"] and len(short["samples"]) == 1


def test_eval_finds_a_shipped_dataset_from_any_folder(tiny_run, tmp_path, monkeypatch):
    """The README's transfer-set command names `data_prep/sources/...`: found as a recipe's files are (from here, else
    the repository or the installed package), not from the current folder only."""
    import json

    from posttrain import cli as posttrain_cli

    monkeypatch.chdir(tmp_path)
    assert posttrain_cli.main(["eval", str(tiny_run), "--stage", "sft", "--dataset",
                               "data_prep/sources/arithmetic_transfer.jsonl", "--split", "train", "--limit", "2",
                               "--max-new-tokens", "2", "--out", str(tmp_path / "transfer.json")]) == 0
    assert json.loads((tmp_path / "transfer.json").read_text())["n"] == 2


def test_eval_of_an_adapter_folder_renders_prompts_with_its_own_tokenizer(tiny_run, tmp_path, monkeypatch):
    """A stage's (or an export's) folder carries the tokenizer and chat template it was trained with; `eval --model
    BASE --adapter DIR` renders the prompts with them, not with the base model's template."""
    from posttrain import evaluate
    from posttrain.cli import main

    seen = {}
    monkeypatch.setattr(evaluate, "run_saved", lambda settings, model, tokenizer, adapter, out, **kw:
                        seen.update(tokenizer=tokenizer, adapter=adapter) or {})
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}\n')
    data = ["--dataset", str(rows), "--split", "train"]
    assert main(["eval", "--model", "tiny:llama", "--adapter", str(tiny_run / "sft"), *data]) == 0
    assert seen == {"tokenizer": str(tiny_run / "sft"), "adapter": str(tiny_run / "sft")}
    bare = tmp_path / "bare-adapter"  # an adapter folder without a tokenizer: the base model's
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((tiny_run / "sft" / name).read_bytes())
    assert main(["eval", "--model", "tiny:llama", "--adapter", str(bare), *data]) == 0
    assert seen["tokenizer"] is None


def test_a_posttrain_process_skips_the_final_collection_once(monkeypatch):
    """The CLI (like every stage, evaluation and data job entry) freezes the heap at exit, so the interpreter's last
    collection does not walk torch's and TRL's objects (about 2 s a process); registered once however often called."""
    import atexit
    import gc

    from posttrain import skip_final_collection
    from posttrain.cli import main

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    skip_final_collection.cache_clear()
    try:
        assert main(["data", "list"]) == 0
        assert main(["data", "list"]) == 0
    finally:
        skip_final_collection.cache_clear()
    assert registered == [gc.freeze]


def test_eval_names_a_wrong_model_adapter_or_dataset(tmp_path, capsys, monkeypatch):
    """`posttrain eval --model ... --dataset ...` resolves the model as a recipe would and checks the dataset and the
    adapter before loading anything: each mistake is one line naming it, never a library traceback."""
    from posttrain.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4", "domain": "arithmetic"}\n')
    data = ["--dataset", str(rows), "--split", "train"]
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text('{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "solution": "4"}\n')
    cases = [
        (["--model", "someone/not-cached", *data], "'someone/not-cached' is not in the local Hugging Face cache"),
        (["--model", str(tmp_path / "missing"), *data], "is neither a local folder nor a Hub id"),
        (["--model", "tiny:qwen2", "--adapter", str(tmp_path), *data], "no adapter_config.json there"),
        (["--model", "someone/not-cached", "--dataset", str(tmp_path / "none.jsonl")], "none.jsonl"),  # data first
        (["--model", "someone/not-cached", "--dataset", str(unanswered), "--split", "train"],
         "prompt rows need the columns prompt (a list of {role, content} messages) and answer"),
        (["--model", "tiny:qwen2", *data, "--out", str(rows / "metrics.json")],  # a file where a folder must be
         f"cannot create the folder for --out {rows}: File exists"),
        (["--model", "tiny:qwen2", *data, "--out", str(tmp_path)],  # refused before evaluating, not after
         f"--out {tmp_path}: it is a folder"),
    ]
    for args, expected in cases:
        assert main(["eval", *args]) == 2, args
        printed = capsys.readouterr().out
        assert expected in printed and "Traceback" not in printed, (args, printed)


TINY = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml")


def test_stage_flags_are_checked_before_a_dry_run_passes(tmp_path, capsys):
    """--only/--from/--until name stages of the recipe, also in a dry run; --only or --from past --until is said so;
    --only with --from (which would silently drop --from) is refused by the parser."""
    from posttrain.cli import main

    for flag in ("--only", "--from", "--until"):
        assert main(["run", TINY, flag, "ppo", "--dry-run"]) == 2
        assert f"{flag}: stage 'ppo' is not in recipe" in capsys.readouterr().out
    assert main(["run", TINY, "--only", "upo", "--until", "sft", "--dry-run", "--output-dir", str(tmp_path)]) == 2
    shown = " ".join(capsys.readouterr().out.split())
    assert "--only upo: the stage comes after --until sft" in shown and "is not in recipe" not in shown
    with pytest.raises(SystemExit) as stop:
        main(["run", TINY, "--only", "upo", "--from", "sft", "--dry-run"])
    assert stop.value.code == 2 and "argument --from: not allowed with argument --only" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_dry_run_refuses_a_sharded_engine_on_cpu_as_the_run_does(capsys):
    """A dry run with an FSDP config on a machine without CUDA: refused as `posttrain run` refuses it, not passed."""
    from posttrain.cli import main

    fsdp = str(Path(TINY).parent.parent / "accelerate" / "fsdp.yaml")
    assert main(["run", TINY, "--accelerate-config", fsdp, "--dry-run"]) == 2
    assert "distributed_type FSDP needs CUDA GPUs and none is visible" in " ".join(capsys.readouterr().out.split())


COUNTS = [
    (["run", TINY, "--num-processes", "-1"], "argument --num-processes: must be at least 1, got -1"),
    (["run", TINY, "--num-processes", "0"], "argument --num-processes: must be at least 1, got 0"),
    (["run", TINY, "--num-machines", "0"], "argument --num-machines: must be at least 1, got 0"),
    (["run", TINY, "--machine-rank", "-1"], "argument --machine-rank: must be at least 0, got -1"),
    (["ablate", TINY, "--seeds", "0"], "argument --seeds: must be at least 1, got 0"),
    (["chat", "outputs/x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["eval", "outputs/x", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["eval", "outputs/x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["eval", "outputs/x", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["eval", "outputs/x", "--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
]


@pytest.mark.parametrize("argv, said", COUNTS, ids=[" ".join(argv[:1] + argv[2:]) for argv, _ in COUNTS])
def test_counts_on_the_command_line_are_checked(argv, said, capsys):
    """Refused by the parser, in its own words, before anything runs (0 processes, 0 tokens, a batch of 0)."""
    from posttrain.cli import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2 and said in capsys.readouterr().err


def test_eval_refuses_a_run_folder_with_a_model(tmp_path, capsys):
    """A run's stage is evaluated on the run's own base model: a --model beside it would be ignored, so it is refused."""
    from posttrain.cli import main

    assert main(["eval", str(tmp_path), "--model", "tiny:qwen2"]) == 2
    assert "give a run folder" in capsys.readouterr().out
