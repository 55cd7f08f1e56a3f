"""Every stage under DDP and under FSDP2 (two gloo processes on CPU each) against one process on the same global batch.

`tests/distributed_stages.py` runs SFT -> DPO -> UPO (online + offline pairs) -> UPO (online pairs only) through the
stages' real `main()`; the fixture runs it as one process, as two DDP processes and as two FSDP2 processes (launched
with `recipes/accelerate/fsdp.yaml`; see that script for the one line that lets accelerate shard on CPU), all side
by side, and the tests compare what they saved.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.errors import UserError
from posttrain.nodes import free_port  # a free port per run: tests in parallel never share a rendezvous

SCRIPT = Path(__file__).resolve().parent / "distributed_stages.py"
FSDP_CONFIG = SCRIPT.parent.parent / "recipes" / "accelerate" / "fsdp.yaml"
STAGES = ["sft", "dpo", "upo", "upo_online"]
TINY_RECIPE = SCRIPT.parent.parent / "recipes" / "tiny" / "text.yaml"


def launch_two(*args: str, config: Path | None = None) -> list[str]:
    engine = ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend",
                                                            "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", str(free_port()), *args]


@pytest.fixture(scope="module")
def runs(tiny_model_path, task_data, tmp_path_factory):
    """{"one": folder, "ddp": folder, "fsdp": folder}. The timeout is the hang test: a collective that one process
    never joins (e.g. a DPO forward only the process holding a pair runs) blocks until it is killed."""
    model = str(tiny_model_path("llama"))
    root = tmp_path_factory.mktemp("distributed")
    script = [str(SCRIPT), model, str(task_data)]
    commands = {"one": ([sys.executable, *script, str(root / "one")], {}),
                "ddp": (launch_two(*script, str(root / "ddp")), {}),
                "fsdp": (launch_two(*script, str(root / "fsdp"), config=FSDP_CONFIG), {"FSDP_ON_CPU": "1"})}
    processes = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **env})
                 for name, (cmd, env) in commands.items()}
    for name, process in processes.items():
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in processes.values():
                p.kill()
            pytest.fail(f"{name}: still running after 300 s (a collective one process never joined hangs)")
        assert process.returncode == 0, f"{name} failed:\n{output[-4000:]}"
    return {name: root / name for name in commands}


def assert_same_adapter(run: Path, reference: Path, stage: str) -> None:
    ours, theirs = (load_file(folder / stage / "adapter_model.safetensors") for folder in (run, reference))
    assert sorted(ours) == sorted(theirs) and len(ours) == 28  # 7 linear modules x 2 layers x (A, B)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    metrics = json.loads((run / stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == 2
    assert metrics["adapter"]["reloads_equal"] and metrics["adapter"]["adapter_tensors"] == 28


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_what_one_process_trains(runs, stage):
    assert_same_adapter(runs["ddp"], runs["one"], stage)
    engine = json.loads((runs["ddp"] / stage / "engine-rank1.json").read_text())
    assert engine == {"distributed_type": "DistributedType.MULTI_CPU", "sharded": False}


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp2_saves_the_whole_adapter(runs, stage):
    """Sharded weights (each process holds a slice of every LoRA tensor) still save a complete adapter: every
    tensor present and non-zero, equal to one process's and to the gathered trained weights (the stage's check)."""
    for rank in (0, 1):
        engine = json.loads((runs["fsdp"] / stage / f"engine-rank{rank}.json").read_text())
        assert engine == {"distributed_type": "DistributedType.FSDP", "sharded": True}
    assert_same_adapter(runs["fsdp"], runs["one"], stage)
    saved = load_file(runs["fsdp"] / stage / "adapter_model.safetensors")
    assert all(torch.count_nonzero(tensor) > 0 for tensor in saved.values())


def test_held_out_evaluation_in_the_stage_unless_the_weights_are_sharded(runs):
    """One process and DDP evaluate the trained adapter in the stage (under DDP every process holds the whole model
    and generates half the prompts); under FSDP a forward on one process alone would wait for the other processes
    forever, so the stage records why it did not evaluate and `posttrain run` evaluates the saved adapter in a process
    of its own (`test_pipeline`)."""
    for engine in ("one", "ddp", "fsdp"):
        for stage in ("sft", "dpo"):
            metrics = json.loads((runs[engine] / stage / "metrics.json").read_text())
            if engine == "fsdp":
                assert metrics["eval"] is None, stage
                assert metrics["eval_deferred"] == "FSDP sharded the weights over 2 processes", stage
                continue
            evaluation, alone = metrics["eval"], json.loads((runs["one"] / stage / "metrics.json").read_text())["eval"]
            assert evaluation["n"] == 4 and "eval_deferred" not in metrics, (engine, stage)
            assert evaluation["processes"] == (2 if engine == "ddp" else 1), (engine, stage)
            assert evaluation["prompts_sha"] == alone["prompts_sha"] and len(evaluation["verdicts"]) == 4
            assert evaluation["heldout_loss"] == pytest.approx(alone["heldout_loss"], rel=1e-3), (engine, stage)
        preference = json.loads((runs[engine] / "dpo" / "metrics.json").read_text())["preference"]
        measured = [preference["before"], preference["after"]]
        assert measured == [None, None] if engine == "fsdp" else all(p["n"] == 4 for p in measured), engine


def test_dpo_reference_is_the_previous_stage(runs):
    """The frozen "ref" adapter (the SFT stage) is not saved as part of the DPO adapter, and DPO moved away from it."""
    assert not (runs["ddp"] / "dpo" / "ref").exists() and not (runs["fsdp"] / "dpo" / "ref").exists()
    sft, dpo = (load_file(runs["ddp"] / stage / "adapter_model.safetensors") for stage in ("sft", "dpo"))
    assert any(not torch.equal(sft[key], dpo[key]) for key in sft)


def test_a_process_without_pairs_runs_the_same_forwards(runs):
    """Online pairs only, one 4-rollout group per step spanning both processes, the best rollout always on process 0:
    process 1 holds no pair in any step while process 0 holds one, and the run finished (the fixture's timeout)."""
    for engine in ("ddp", "fsdp"):
        counts = [json.loads((runs[engine] / "upo_online" / f"pairs-rank{r}.json").read_text()) for r in (0, 1)]
        assert counts == [[1, 1], [0, 0]], engine
        both = [json.loads((runs[engine] / "upo" / f"pairs-rank{r}.json").read_text()) for r in (0, 1)]
        assert both == [[2, 2], [1, 1]], engine  # plus one offline pair on each process


@pytest.mark.multinode  # 30 s of the CLI on two processes: the `multinode` line of .ci/run
def test_two_process_cpu_run(tmp_path, posttrain_cli):
    """`posttrain run --num-processes 2` on CPU: one gloo data-parallel job of two processes, through the CLI. The
    base model's evaluation runs as two processes too, each generating half the prompts, as the stage's does."""
    posttrain_cli("run", TINY_RECIPE, "name=ddp", "eval.limit=4", "eval.max_new_tokens=4", "--num-processes", "2",
                  "--only", "sft", cwd=tmp_path)
    run = tmp_path / "outputs" / "ddp"
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train"]["global_step"] == 3
    base = json.loads((run / "base" / "metrics.json").read_text())["eval"]
    assert base["processes"] == metrics["eval"]["processes"] == 2 and base["n"] == metrics["eval"]["n"] == 4
    assert base["heldout_loss"] is not None and base["prompts_sha"] == metrics["eval"]["prompts_sha"]


def test_a_rendezvous_port_is_drawn_outside_the_ports_outgoing_connections_take(monkeypatch):
    """Ports of the kernel's ephemeral range also go to outgoing connections (gloo opens many), which can take one
    between the check and the store's bind; draws are the system's, unaffected by a seeded `random`."""
    import random
    import socket

    from posttrain import nodes

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    random.seed(0)
    first = nodes.free_port()
    random.seed(0)
    drawn = {first, *(nodes.free_port() for _ in range(20))}
    assert all(port in nodes.RENDEZVOUS_PORTS and port < low for port in drawn) and len(drawn) > 15
    taken = []
    try:  # every port of the range held: any free port still
        monkeypatch.setattr(nodes, "RENDEZVOUS_PORTS", range(first, first + 1))
        taken.append(socket.socket())
        taken[0].bind(("", first))
        assert nodes.free_port() != first
    finally:
        for sock in taken:
            sock.close()


def test_two_runs_on_one_machine_get_ports_of_their_own(tmp_path):
    """Several processes on one machine meet on a free port, not on accelerate's default 29500, on which a second run
    on the same machine (two experiments on two halves of its GPUs) failed at once with EADDRINUSE; a config file
    that names its port keeps it."""
    import socket

    from posttrain.devices import accelerate_launch_args

    ports = []
    for _ in range(2):
        flags = accelerate_launch_args(None, 2)
        ports.append(int(flags[flags.index("--main_process_port") + 1]))
    with socket.socket() as taken:  # a run holding one port
        taken.bind(("", ports[0]))
        flags = accelerate_launch_args(None, 2)
        assert int(flags[flags.index("--main_process_port") + 1]) != ports[0]
    assert "--main_process_port" not in accelerate_launch_args(None, 1)  # one process has no process group to meet in
    named = tmp_path / "ddp.yaml"
    named.write_text(FSDP_CONFIG.read_text().replace("distributed_type: FSDP", "distributed_type: MULTI_GPU")
                     + "main_process_port: 29555\n")
    assert "--main_process_port" not in accelerate_launch_args(str(named))
    flags = accelerate_launch_args(str(SCRIPT.parent.parent / "recipes" / "accelerate" / "ddp.yaml"))
    assert int(flags[flags.index("--main_process_port") + 1]) > 0
    listed = tmp_path / "listed.yaml"
    listed.write_text("- distributed_type: MULTI_GPU\n")
    with pytest.raises(UserError, match=r"listed.yaml: expected a mapping of accelerate settings"):
        accelerate_launch_args(str(listed))


def test_one_process_runs_without_accelerates_launcher_in_between():
    """A stage of one process is started as `accelerate launch` would start it (accelerate builds its command and
    environment), without the launcher in between: on SIGTERM to every process of a job (SLURM) the launcher killed
    its child 5 s later, mid-save for a large model. Several processes keep the launcher, which starts them."""
    from posttrain.childproc import LAUNCHER
    from posttrain.devices import accelerate_launch_args, direct_command

    script = ["-m", "posttrain.stages.sft", "--config", "stage.yaml"]
    flags = accelerate_launch_args(None, 1)
    cmd, env = direct_command(flags, script)
    assert cmd == [sys.executable, *script] and LAUNCHER not in cmd
    threads = flags[flags.index("--num_cpu_threads_per_process") + 1]
    assert env["ACCELERATE_USE_CPU"] == "True" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert env["OMP_NUM_THREADS"] == threads and env["PATH"] == os.environ["PATH"]  # the environment, plus accelerate's
    assert direct_command(accelerate_launch_args(None, 2), script) is None  # gloo DDP: accelerate's launcher


def test_the_stage_decides_mixed_precision_with_an_accelerate_config():
    """Every shipped accelerate config says `mixed_precision: bf16`; TrainingArguments keeps that when a stage says
    `bf16: false` (it only overrides it with bf16 or fp16 on), so the launch leaves the choice to the stage, as
    without a config file."""
    from posttrain.devices import accelerate_launch_args, direct_command

    root = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
    flags = accelerate_launch_args(str(root / "single_gpu.yaml"), 1)
    assert flags[flags.index("--mixed_precision") + 1] == "no"
    _, env = direct_command(flags, ["-m", "posttrain.stages.sft", "--config", "stage.yaml"])
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_a_sharded_adapter_is_gathered_through_the_wrapped_model(tiny_model_path):
    """Under DeepSpeed the Trainer leaves `model` as the bare PEFT module and keeps the engine in `model_wrapped`;
    ZeRO-3's gather is the engine's (`accelerator.get_state_dict` calls it on what it is given), so the adapter is
    read through `model_wrapped` (it crashed after training, every time)."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from posttrain.models import load_model
    from posttrain.stages.adapter_checks import live_adapter

    peft_model = get_peft_model(load_model(tiny_model_path("llama")), LoraConfig(r=2, target_modules=["q_proj"]))
    engine = SimpleNamespace(module=peft_model)
    given = []

    def get_state_dict(model):
        given.append(model)
        return model.module.state_dict()

    accelerator = SimpleNamespace(unwrap_model=lambda model: getattr(model, "module", model),
                                  get_state_dict=get_state_dict, is_main_process=True)
    trainer = SimpleNamespace(model=peft_model, model_wrapped=engine, accelerator=accelerator,
                              is_fsdp_enabled=False, is_deepspeed_enabled=True)
    adapter = live_adapter(trainer)
    assert given == [engine] and adapter and all("lora_" in name for name in adapter)


def test_a_finished_stage_tears_its_process_group_down():
    """`end_processes`, the last call of every stage process (`common.entry`), destroys the process group, so it is
    not left to interpreter shutdown (where gloo's threads sometimes outlived it: SIGABRT after a finished stage)."""
    import torch.distributed as dist

    from posttrain.stages import common

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in memory: no rendezvous to hang
    assert dist.is_initialized()
    common.end_processes()
    assert not dist.is_initialized()
    common.end_processes()  # and nothing to do without one
