"""SFT -> DPO -> UPO on tiny VLMs under DDP and under FSDP2 (two gloo processes on CPU each) against one process.

`tests/distributed_vision.py` (the vision twin of `tests/distributed_stages.py`) runs the chain on easy-VQA, images
only and with a text row after each image row (`tests/test_vision.py`'s `vqa` and `mixed` sets): with the global batch
of 4 split in 2 + 2, some steps give one process text rows only while the other has images, so its vision tower does
not run. Each set runs as one process, DDP and FSDP side by side; the adapters must match one process's.

ERNIE-4.5-VL (its MoE load-balancing loss off: see `distributed_stages.COMMON`) runs on the mixed set, where a
process's micro-batch of text prompts leaves its vision experts out of GRPO's forward while the offline image pairs'
forward uses them (`moe_routing.vision_experts_in_graph`).
"""

import json
from pathlib import Path

import pytest
from test_distributed import assert_same_adapter, launch_engines
from test_vision import mixed, vqa  # noqa: F401 (fixtures)

SCRIPT = Path(__file__).resolve().parent / "distributed_vision.py"
STAGES = ["sft", "dpo", "upo", "upo_online"]
ENGINES = ["ddp", "fsdp"]


# one test per set, its three launches side by side: under xdist, tests of one set on two workers launched it twice
@pytest.mark.multinode  # about 2.5 minutes of several-process runs on 2 cores: the `multinode` line of .ci/run
@pytest.mark.parametrize("arch,name", [("qwen2_vl", "vqa"), ("qwen2_vl", "mixed"), ("llava", "vqa"),
                                       ("llava", "mixed"), ("ernie4_5_vl", "mixed")])
def test_two_processes_train_a_vlm_as_one_process_does(arch, name, vqa, mixed,  # noqa: F811
                                                       tiny_model_path, tmp_path):
    tiny_model_path(arch)  # built here, once: not by the five processes below at the same moment
    runs = launch_engines([str(SCRIPT), arch, str({"vqa": vqa, "mixed": mixed}[name])], tmp_path, 400)
    for engine in ENGINES:
        check_same_training(runs[engine], runs["one"], engine, text_rows=name == "mixed")


def check_same_training(ours: Path, reference: Path, engine: str, text_rows: bool) -> None:
    for stage in STAGES:
        # 5e-4: UPO with offline pairs moves a few weights by up to 2e-4 with another batch layout in one process too
        assert_same_adapter(ours, reference, stage, tensors=None, atol=5e-4, where=f"{engine} ")
        engine_used = json.loads((ours / stage / "engine-rank1.json").read_text())
        assert engine_used["sharded"] == (engine == "fsdp"), (engine, stage)
    if text_rows:  # a step in which one process trained on text rows only and the other had images
        steps = [json.loads((ours / "sft" / f"batches-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert any(min(a[1], b[1]) == 0 < max(a[1], b[1]) for a, b in zip(*steps)), (engine, steps)
    pairs = [json.loads((ours / "upo_online" / f"pairs-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert pairs == [[1, 1], [0, 0]], engine  # process 1 scored a placeholder without images, process 0 a pair
