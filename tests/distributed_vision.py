"""SFT -> DPO -> UPO on a tiny VLM, as one script that runs the same under 1 process, DDP or FSDP.

    python tests/distributed_vision.py ARCH DATA OUT [STAGES]                    # one process (the reference)
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_vision.py ARCH DATA OUT
    FSDP_ON_CPU=1 accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
        --mixed_precision no tests/distributed_vision.py ARCH DATA OUT

`tests/distributed_stages.py` for vision: ARCH is a tiny VLM (`tiny:<ARCH>`), DATA a folder of easy-VQA `tasks`
(sft / prompts / test) and `pairs` (train / test), images only or with text rows among them (`tests/test_vision.py`'s
`vqa` and `mixed` sets). The same global batch whatever the number of processes, fixed rollouts instead of sampled
ones (see that script), and a one-pair offline file (the first image pair) so that every process draws the same
offline pair. Each process writes the (rows, images) of every batch it trained on to
`OUT/<stage>/batches-rank<N>.json`: whether a process ever trained on text rows alone while the other had images.
"""

import json
from pathlib import Path

from distributed_stages import (
    COMMON,
    RANK,
    WORLD,
    lora,
    record_engine,
    run_script,
    upo_stages,
)
from transformers import Trainer
from trl import DPOConfig, SFTConfig

from posttrain.configs import StageArguments
from posttrain.data import load_split
from posttrain.models import resolve_model
from posttrain.stages import dpo, sft

SAVE = {"llava": ["multi_modal_projector"]}  # LLaVA trains its projector in SFT, as `tests/test_vision.py`'s chain
BATCHES: list[list[int]] = []


def fixed_rollouts(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """`distributed_stages.fixed_rollouts` with ids of plain text tokens: 10..499 holds no image token of the tiny
    VLMs (a VLM's config has no top-level `vocab_size`, and an image token in a completion breaks its forward)."""
    first = self.accelerator.process_index * len(prompt_ids)
    completions = []
    for index, prompt in enumerate(prompt_ids):
        place = (first + index) % num_generations
        completions.append([(sum(prompt) + 7 * j + 3) % 490 + 10 for j in range(place + 1)]
                           + [self._tokenizer.eos_token_id])
    return completions, None


def counting_batches(original):
    def training_step(self, model, inputs, *args, **kwargs):
        if isinstance(inputs, list):  # GRPO's: prompt rows, before generation
            return original(self, model, inputs, *args, **kwargs)
        rows = next(len(value) for key, value in inputs.items() if key.endswith("input_ids"))
        images = inputs.get("num_images")
        images = sum(images) if images is not None else len(inputs.get("image_grid_thw", inputs.get("pixel_values",
                                                                                                        [])))
        BATCHES.append([rows, int(images)])
        return original(self, model, inputs, *args, **kwargs)

    return training_step


def write_offline(data: Path, folder: Path) -> Path:
    """The first image pair of DATA's pairs, alone: one and two processes draw the same offline pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = load_split(data / "pairs", "train")
    pairs.select([next(i for i, row in enumerate(pairs) if row["images"])]).to_parquet(folder / "train.parquet")
    return folder


def finish(trainer, out: Path) -> None:
    (out / f"batches-rank{RANK}.json").write_text(json.dumps(BATCHES))
    BATCHES.clear()
    record_engine(trainer, out)


def main(arch: str, data: Path, out: Path, stages: list[str]) -> None:
    model = str(resolve_model(f"tiny:{arch}"))
    offline = write_offline(data, out / f"inputs-rank{RANK}" / "offline")
    batch = 4 // WORLD  # per process: the global batch is 4 rows (SFT, DPO) or 4 rollouts of one prompt (UPO)
    held_out = dict(eval_dataset=str(data / "tasks"), eval_limit=4, eval_max_new_tokens=4, eval_batch_size=4)
    Trainer.training_step = counting_batches(Trainer.training_step)
    if "sft" in stages:
        stage = StageArguments(dataset_name=str(data / "tasks"), dataset_train_split="sft", max_train_samples=16,
                               tokenizer_name_or_path=model, **held_out)
        training = SFTConfig(output_dir=str(out / "sft"), per_device_train_batch_size=batch, max_length=160, **COMMON)
        finish(sft.main(stage, training, lora(model, lora_modules_to_save=SAVE.get(arch))), out / "sft")
    if "dpo" in stages:
        stage = StageArguments(dataset_name=str(data / "pairs"), tokenizer_name_or_path=model,
                               adapter_path=str(out / "sft"), **held_out)
        training = DPOConfig(output_dir=str(out / "dpo"), per_device_train_batch_size=batch, max_length=160, beta=0.1,
                             **COMMON)
        finish(dpo.main(stage, training, lora(model)), out / "dpo")
    # image prompts in one thinking mode: GRPO renders them with one template setting
    upo_stages(data / "tasks", model, out, batch, offline, stages, done=finish, rollouts=fixed_rollouts,
               chat_template_kwargs={"enable_thinking": False})


if __name__ == "__main__":
    run_script(main, gloo_timeout_s=120)  # 2 minutes, not 30: a hang shows as a traceback
