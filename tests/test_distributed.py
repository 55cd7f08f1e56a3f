"""Every stage under DDP and under FSDP2 (two gloo processes on CPU each) against one process on the same global batch.

`tests/distributed_stages.py` runs SFT -> DPO (and DPO again, its reference log-probs precomputed) -> UPO (online +
offline pairs) -> UPO (online pairs only) through the stages' real `main()`; the fixture runs it as one process, as
two DDP processes and as two FSDP2 processes (launched with `recipes/accelerate/fsdp.yaml`; see that script for the
one line that lets accelerate shard on CPU), all side by side, and the tests compare what they saved.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.devices import NO_LOG_DIR
from posttrain.errors import UserError
from posttrain.nodes import free_port  # a free port per run: tests in parallel never share a rendezvous
from posttrain.trainers.dpo_trainer import REF_LOGPS

SCRIPT = Path(__file__).resolve().parent / "distributed_stages.py"
FSDP_CONFIG = SCRIPT.parent.parent / "recipes" / "accelerate" / "fsdp.yaml"
STAGES = ["sft", "dpo", "dpo_precomputed", "upo", "upo_online"]
TINY_RECIPE = SCRIPT.parent.parent / "recipes" / "tiny" / "text.yaml"


def launch_two(*args: str, config: Path | None = None) -> list[str]:
    engine = ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend",
                                                            "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", str(free_port()), *NO_LOG_DIR, *args]


@pytest.fixture(scope="module")
def runs(tiny_model_path, task_data, tmp_path_factory):
    """{"one": folder, "ddp": folder, "fsdp": folder} (`launch_engines`; its timeout catches e.g. a DPO forward only
    the process holding a pair runs)."""
    model = str(tiny_model_path("llama"))
    return launch_engines([str(SCRIPT), model, str(task_data)], tmp_path_factory.mktemp("distributed"), 300)


def launch_engines(script: list[str], root: Path, timeout: int) -> dict[str, Path]:
    """{run: folder}: `script` as one process, as two DDP processes and as two FSDP2 processes, side by side, each
    given its folder under `root`; each must exit 0. The timeout is the hang test: a collective that one process
    never joins blocks until it is killed."""
    commands = {"one": ([sys.executable, *script, str(root / "one")], {}),
                "ddp": (launch_two(*script, str(root / "ddp")), {}),
                "fsdp": (launch_two(*script, str(root / "fsdp"), config=FSDP_CONFIG), {"FSDP_ON_CPU": "1"})}
    processes = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **env})
                 for name, (cmd, env) in commands.items()}
    outputs = {}
    for name, process in processes.items():
        try:
            outputs[name], _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes.values():
                p.kill()
            pytest.fail(f"{name}: still running after {timeout} s (a collective one process never joined hangs)")
    for name, process in processes.items():
        assert process.returncode == 0, f"{name} failed:\n{outputs[name][-4000:]}"
    return {name: root / name for name in processes}


def assert_same_adapter(run: Path, reference: Path, stage: str, tensors: int | None = 28, atol: float = 1e-4,
                        where: str = "") -> None:
    """`run`'s `stage` trained on two processes what `reference`'s did on one: the same adapter tensors (`tensors`
    of them, when given) to `atol`, two steps, an adapter that reloads equal. `where` heads the messages."""
    ours, theirs = (load_file(folder / stage / "adapter_model.safetensors") for folder in (run, reference))
    assert sorted(ours) == sorted(theirs) and len(ours) == (tensors or len(ours)), f"{where}{stage}"
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=atol,
                                   msg=lambda m, k=f"{where}{stage} {key}": f"{k}: {m}")
    metrics = json.loads((run / stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == 2, f"{where}{stage}"
    assert metrics["adapter"]["reloads_equal"], f"{where}{stage}"
    assert tensors is None or metrics["adapter"]["adapter_tensors"] == tensors, f"{where}{stage}"


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


def test_precomputed_reference_log_probs_reach_every_process(runs):
    """TRL's main process writes them to a file every process then opens; beside the dataset's Arrow files, in one
    process's datasets cache, the other process (another cache folder, as on a second machine) found none. Under the
    stage's folder they reach both; the harness checks each process trained on them, and the folder is gone once the
    stage finishes. Computed before training or during it, the reference is the same: so is the adapter."""
    for engine, folder in runs.items():
        assert not (folder / "dpo_precomputed" / REF_LOGPS).exists(), engine
    precomputed, during = (load_file(runs["one"] / stage / "adapter_model.safetensors")
                           for stage in ("dpo_precomputed", "dpo"))
    for key in during:
        torch.testing.assert_close(precomputed[key], during[key], rtol=1e-4, atol=1e-5)


def test_a_process_without_pairs_runs_the_same_forwards(runs):
    """Online pairs only, one 4-rollout group per step spanning both processes, the best rollout always on process 0:
    process 1 holds no pair in any step while process 0 holds one, and the run finished (the fixture's timeout)."""
    for engine in ("ddp", "fsdp"):
        counts = [json.loads((runs[engine] / "upo_online" / f"pairs-rank{r}.json").read_text()) for r in (0, 1)]
        assert counts == [[1, 1], [0, 0]], engine
        both = [json.loads((runs[engine] / "upo" / f"pairs-rank{r}.json").read_text()) for r in (0, 1)]
        assert both == [[2, 2], [1, 1]], engine  # plus one offline pair on each process


@pytest.mark.multinode  # about 45 s of several-process runs on 2 cores: the `multinode` line of .ci/run
def test_an_moe_model_trains_under_ddp_and_fsdp2_as_in_one_process(tiny_model_path, task_data, tmp_path):
    """ERNIE-4.5's MoE (LoRA on its router and on its experts' fused weights, `models.moe_lora`) through every stage
    under DDP and FSDP2 against one process, with its load-balancing loss off (`distributed_stages.COMMON`). 2e-4:
    UPO with offline pairs moves an expert weight by 9e-5 against one process."""
    model = str(tiny_model_path("ernie4_5_moe"))
    runs = launch_engines([str(SCRIPT), model, str(task_data)], tmp_path, 400)
    saved = load_file(runs["one"] / "sft" / "adapter_model.safetensors")
    assert any(".experts." in key for key in saved) and any(".gate." in key for key in saved), sorted(saved)
    for engine in ("ddp", "fsdp"):
        for stage in STAGES:
            assert_same_adapter(runs[engine], runs["one"], stage, tensors=None, atol=2e-4, where=f"{engine} ")


@pytest.mark.multinode  # 30 s of the CLI on two processes: the `multinode` line of .ci/run
def test_two_process_cpu_run(tmp_path, posttrain_cli):
    """`posttrain run --num-processes 2` on CPU: one gloo data-parallel job of two processes, through the CLI. The
    base model's evaluation runs as two processes too, each generating half the prompts, as the stage's does."""
    temp = tmp_path / "temp"
    temp.mkdir()
    posttrain_cli("run", TINY_RECIPE, "name=ddp", "eval.limit=4", "eval.max_new_tokens=4", "--num-processes", "2",
                  "--only", "sft", cwd=tmp_path, env={"TMPDIR": str(temp)})
    assert not list(temp.glob("torchelastic_*"))  # torchrun's log folders, one a launch, were left there
    run = tmp_path / "outputs" / "ddp"
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train"]["global_step"] == 3
    base = json.loads((run / "base" / "metrics.json").read_text())["eval"]
    assert base["processes"] == metrics["eval"]["processes"] == 2 and base["n"] == metrics["eval"]["n"] == 4
    assert base["heldout_loss"] is not None and base["prompts_sha"] == metrics["eval"]["prompts_sha"]


@pytest.mark.multinode  # two launches of two processes: the `multinode` line of .ci/run
def test_the_pair_job_divides_its_prompts_between_two_processes(tiny_model_path, task_data, tmp_path):
    """Launched as two processes (as `posttrain run` launches it with several GPUs or --num-processes), the on-policy
    pair job samples half of the replies in each, each process journaling its own (left by a run that found no pair,
    for a rerun to resume), and one process writes the pairs once, the journals then removed."""
    args = ["-m", "data_prep.jobs", "build_onpolicy_pairs", "--model_name_or_path", str(tiny_model_path("llama")),
            "--prompts", str(task_data), "--max_train_prompts", "6", "--max_test_prompts", "4", "--num_samples", "3",
            "--max_new_tokens", "6", "--output_dir", str(tmp_path / "pairs")]

    def job(*rewards):
        return subprocess.run(launch_two(*args, *rewards), capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})

    failed = job("--rewards", "accuracy=1.0", "--margin", "0.5")  # a random model is never right: no pair
    assert failed.returncode != 0 and "no prompt gave a pair" in failed.stderr, failed.stderr[-3000:]
    for index in (0, 1):
        lines = [json.loads(line) for line in
                 (tmp_path / f".pairs.sampling.{index}-of-2.jsonl").read_text().splitlines()]
        assert sum(len(line.get("texts", [])) for line in lines) == (6 + 4) * 3 // 2, "half of the replies each"
    done = job("--rewards", "length_penalty=1.0", "--margin", "0.0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and (tmp_path / "pairs" / "card.json").is_file()
    assert not list(tmp_path.glob(".pairs.sampling*")), "the journals are removed once the pairs are written"


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


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "ernie4_5_vl"])
def test_fsdp_keeps_a_vlms_vision_tower_in_the_root_unit(arch, tiny_model_path):
    """FSDP gathers a unit's weights when the unit runs, and the vision tower runs only on a process whose rows have
    images: with its blocks as units of their own (accelerate wraps every class of `_no_split_modules`), a step in
    which another process had text rows only (a set mixing both; UPO scoring a placeholder on a process without
    pairs) exchanged mismatched collectives ("Received data size doesn't match expected size"; a hang on NCCL).
    Every stage leaves them to the root unit, which every forward gathers."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from posttrain.models import load_model
    from posttrain.stages import common

    model = load_model(tiny_model_path(arch))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    trainer = SimpleNamespace(is_fsdp_enabled=True, model=model, add_callback=lambda callback: None,
                              accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    common.freeze_vision(trainer, SimpleNamespace(adapter_path=None),
                         SimpleNamespace(model_name_or_path=str(tiny_model_path(arch))))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [name for name, module in model.model.named_modules() if policy(module)]
    assert units and units == [f"language_model.layers.{i}" for i in range(len(units))]


def test_a_sharded_adapter_with_modules_to_save_is_read_on_the_main_process_alone(tiny_model_path):
    """Under FSDP the gathered state dict is the main process's; the others get an empty one, on which PEFT's
    reading of a module trained in full (LLaVA's projector in `lora_modules_to_save`) stopped them with a KeyError
    after every FSDP stage."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from posttrain.models import load_model
    from posttrain.stages.adapter_checks import live_adapter

    peft_model = get_peft_model(load_model(tiny_model_path("llava")), LoraConfig(
        r=2, target_modules=r".*language_model.*q_proj", modules_to_save=["multi_modal_projector"]))
    accelerator = SimpleNamespace(unwrap_model=lambda model: model, get_state_dict=lambda model: {},
                                  is_main_process=False)
    trainer = SimpleNamespace(model=peft_model, model_wrapped=peft_model, accelerator=accelerator,
                              is_fsdp_enabled=True, is_deepspeed_enabled=False)
    assert live_adapter(trainer) is None
    accelerator.is_main_process, accelerator.get_state_dict = True, lambda model: model.state_dict()
    assert any("multi_modal_projector" in name for name in live_adapter(trainer))


FROZEN_PROJECTOR_UNDER_DDP = """
import os, sys
from types import SimpleNamespace
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from posttrain.models import load_model, load_tokenizer, vision

path = sys.argv[1]
model = get_peft_model(load_model(path), LoraConfig(r=2, target_modules=r".*language_model.*q_proj",
                                                    modules_to_save=["multi_modal_projector"]))
assert vision.freeze_vision(SimpleNamespace(model=model, create_optimizer=lambda: None), None)
processor = load_tokenizer(path)
image = processor(text=["<image> red"], images=[[Image.new("RGB", (32, 32), (255, 0, 0))]], return_tensors="pt")
text = processor(text=["just text"], return_tensors="pt")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in memory: no rendezvous
ddp = DistributedDataParallel(model, find_unused_parameters=True)  # as GRPO asks for under PEFT
loss = ddp(**text, labels=text["input_ids"]).loss + ddp.module(**image, labels=image["input_ids"]).loss
loss.backward()
trained = model.base_model.model.model.language_model.layers[0].self_attn.q_proj.lora_B.default.weight
print("trained" if trained.grad is not None else "no gradient", flush=True)
dist.destroy_process_group()
os._exit(0)  # as a stage process leaves (`stages.common.exit_interrupted`): see the test
"""


def test_a_frozen_projector_is_left_out_of_ddps_all_reduce(tiny_model_path):
    """A continued LLaVA adapter's projector, frozen in DPO and UPO (`vision.freeze_vision`), keeps `requires_grad`
    (PEFT sets it again) and DDP managed it: GRPO's forward on text prompts left it unused, UPO's pairs' forward around
    DDP with an image pair used it, and the backward failed ("Expected to mark a variable ready only once").

    In a process of its own, left without the interpreter's finalization: freed with the GIL held, DDP's reducer
    destroyed the gloo process group, whose destructor waited for a gloo thread that waited for the GIL to free the
    backward's all-reduce, and pytest hung (seen once, in the test's process)."""
    done = subprocess.run([sys.executable, "-c", FROZEN_PROJECTOR_UNDER_DDP, str(tiny_model_path("llava"))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stdout + done.stderr[-3000:]


def test_fsdp_reduce_scatters_zeros_for_weights_only_image_rows_train(tiny_model_path):
    """LLaVA's projector (in `lora_modules_to_save`) gets a gradient only on a process whose rows have images, and
    FSDP2 reduce-scatters only the gradients a process has: a step in which the other process had text rows only
    exchanged mismatched collectives ("Received data size doesn't match expected size"). Every FSDP unit of a VLM
    reduce-scatters zeros for them instead, from the start of training."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from posttrain.models import load_model
    from posttrain.stages import common

    path = tiny_model_path("llava")
    model, callbacks = load_model(path), []
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    trainer = SimpleNamespace(is_fsdp_enabled=True, model=model, model_wrapped=model, add_callback=callbacks.append,
                              accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    common.freeze_vision(trainer, SimpleNamespace(adapter_path=None), SimpleNamespace(model_name_or_path=str(path)))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in memory: no rendezvous
    try:
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        for callback in callbacks:
            callback.on_train_begin(None, None, None)
        groups = [group for module in model.modules() if isinstance(module, FSDPModule)
                  for group in module._get_fsdp_state()._fsdp_param_groups]
        assert groups and all(group.reduce_scatter_unused_params for group in groups)
    finally:
        dist.destroy_process_group()
