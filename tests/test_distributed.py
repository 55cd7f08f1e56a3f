"""Every stage under DDP (two gloo processes on CPU) against one process on the same global batch.

`tests/distributed_stages.py` runs SFT -> DPO -> UPO (online + offline pairs) -> UPO (online pairs only) through the
stages' real `main()`; the fixture runs it once as one process and once as two (side by side, so the module costs one
run's wall time) and the tests compare what they saved.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.nodes import free_port  # a free port per run: tests in parallel never share a rendezvous

SCRIPT = Path(__file__).resolve().parent / "distributed_stages.py"
STAGES = ["sft", "dpo", "upo", "upo_online"]


def launch_two(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *args]


@pytest.fixture(scope="module")
def runs(tiny_model_path, task_data, tmp_path_factory):
    """(one-process output folder, two-process output folder). The timeout is the hang test: a collective that one
    process never joins (e.g. a DPO forward only the process holding a pair runs) blocks until it is killed."""
    model = str(tiny_model_path("llama"))
    root = tmp_path_factory.mktemp("distributed")
    one, two = root / "one", root / "two"
    processes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for cmd in ([sys.executable, str(SCRIPT), model, str(task_data), str(one)],
                             launch_two(str(SCRIPT), model, str(task_data), str(two)))]
    for process, name in zip(processes, ("one process", "two processes")):
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"{name}: still running after 240 s (a collective one process never joined hangs)")
        assert process.returncode == 0, f"{name} failed:\n{output[-4000:]}"
    return one, two


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_what_one_process_trains(runs, stage):
    one, two = (load_file(run / stage / "adapter_model.safetensors") for run in runs)
    assert sorted(one) == sorted(two) and len(one) == 28  # 7 linear modules x 2 layers x (A, B)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    metrics = json.loads((runs[1] / stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == 2
    assert metrics["adapter"]["reloads_equal"] and metrics["adapter"]["adapter_tensors"] == 28


def test_dpo_reference_is_the_previous_stage(runs):
    """The frozen "ref" adapter (the SFT stage) is not saved as part of the DPO adapter, and DPO moved away from it."""
    one, two = runs
    assert not (two / "dpo" / "ref").exists()
    sft, dpo = (load_file(two / stage / "adapter_model.safetensors") for stage in ("sft", "dpo"))
    assert any(not torch.equal(sft[key], dpo[key]) for key in sft)


def test_a_process_without_pairs_runs_the_same_forwards(runs):
    """Online pairs only, one 4-rollout group per step spanning both processes, the best rollout always on process 0:
    process 1 holds no pair in any step while process 0 holds one, and the run finished (the fixture's timeout)."""
    _, two = runs
    counts = [json.loads((two / "upo_online" / f"pairs-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert counts == [[1, 1], [0, 0]]
    both = [json.loads((two / "upo" / f"pairs-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert both == [[2, 2], [1, 1]]  # plus one offline pair on each process
