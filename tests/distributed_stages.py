"""SFT -> DPO -> UPO on a tiny model, as one script that runs the same under 1 process, DDP or FSDP.

    python tests/distributed_stages.py MODEL DATA OUT                          # one process (the reference)
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_stages.py MODEL DATA OUT
    FSDP_ON_CPU=1 accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
        --mixed_precision no tests/distributed_stages.py MODEL DATA OUT

Every stage runs through its real `main()` (load, gates, train, save, verify the adapter, metrics) with the same
*global* batch whatever the number of processes, so the adapters it saves can be compared across world sizes
(`tests/test_distributed.py`). DPO continues the SFT adapter (its frozen copy is the "ref" adapter), twice: its
reference log-probs computed during training, then before it (`dpo_precomputed`); UPO continues DPO.

FSDP on CPU: accelerate (1.15) applies its FSDP plugin only over a GPU device type and otherwise runs gloo DDP,
although torch's FSDP2 (`fully_shard`) itself runs on CPU. With `FSDP_ON_CPU=1` this script turns the distributed
type accelerate chose (MULTI_CPU) into FSDP with the plugin the launch configured, before any trainer reads it; from
there everything is accelerate's and transformers' own FSDP2 path: `fully_shard` per decoder layer, sharded
parameters (DTensors), the full-state-dict gather when the adapter is saved. Each stage records what it really ran
under in `OUT/<stage>/engine-rank<N>.json`.

Rollouts are fixed instead of sampled: sampling draws different tokens on 1 and on 2 processes, so the adapters could
not be compared. Each rollout is a function of its prompt and its place in the prompt's group (in the *global* batch),
with lengths that differ, so `length_penalty` ranks them: the best rollout (place 0) is always on process 0 and the
worst (place 3) on process 1 when a group spans two processes. In `upo_online`, process 1 therefore never holds a
pair while process 0 does, the case that hangs when processes disagree on their number of forwards. Offline pairs:
`upo_offline_ratio=2` draws 2 per step on one process (1 prompt of 4 rollouts) and 1 on each of two (half a prompt
each, rounded up to 1), the same 2 per global step. Each process
writes how many pairs it scored per step to `OUT/pairs-rank<N>.json`.
"""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from trl import DPOConfig, ModelConfig, SFTConfig

from posttrain.configs import CurriculumArguments, StageArguments
from posttrain.stages import dpo, sft, upo
from posttrain.stages.common import end_processes
from posttrain.trainers import UPOConfig, UPOTrainer

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))
# `router_aux_loss_coef`: an MoE model's load-balancing loss (TRL turns it on where the config has a coefficient) is a
# statistic of each micro-batch's tokens, by design another loss on 2 + 2 rows than on 4, and top-k routing turns its
# small difference into other experts trained. Off, so that what is compared is the training the engines must not
# change; no effect on a dense model.
COMMON = dict(max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
              use_cpu=True, seed=0, router_aux_loss_coef=0.0)
PAIR_COUNTS: list[int] = []


def force_fsdp_on_cpu() -> None:
    from accelerate import state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    chosen = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        chosen(self, *args, **kwargs)  # every call copies the process state's type (MULTI_CPU) back in
        if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            if getattr(self, "fsdp_plugin", None) is None:  # once: what a stage set on the plugin stays
                self.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* settings
            self.distributed_type = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


def fixed_rollouts(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """Stands in for GRPO's sampling: rollout k of a group is k + 1 tokens derived from the prompt, then EOS."""
    eos, vocab = self.processing_class.eos_token_id, self.model.config.vocab_size
    first = self.accelerator.process_index * len(prompt_ids)
    completions = []
    for index, prompt in enumerate(prompt_ids):
        place = (first + index) % num_generations
        completions.append([(sum(prompt) + 7 * j + 3) % (vocab - 10) + 5 for j in range(place + 1)] + [eos])
    return completions, None


def counting_pairs(original):
    def pair_logps(self, model, inputs, policy_logps, mode):
        result = original(self, model, inputs, policy_logps, mode)
        PAIR_COUNTS.append(int(result[0].numel()))
        return result

    return pair_logps


def record_engine(trainer, out: Path) -> None:
    """What the trainer really ran under: accelerate's distributed type and whether its weights were sharded
    (FSDP2 turns parameters into DTensors, each process holding a slice)."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
    (out / f"engine-rank{RANK}.json").write_text(json.dumps({"distributed_type": str(
        trainer.accelerator.distributed_type), "sharded": sharded}))


def write_pairs(folder: Path) -> tuple[Path, Path]:
    """DPO pairs (the right sum vs a wrong one; the odd ones call a tool first, whose result DPO does not score, so
    the adapters also compare the masked scoring) and a one-pair offline file for UPO: every process and every draw
    gets that same pair, so one and two processes train on the same offline pairs. Each process writes its own
    copy (no process group exists before the first trainer, so there is nothing to wait on)."""
    def reply(i, answer):
        if i % 2 == 0:
            return [{"role": "assistant", "content": answer}]
        call = [{"type": "function", "function": {"name": "add", "arguments": "{}"}}]
        return [{"role": "assistant", "content": "", "tool_calls": call},
                {"role": "tool", "name": "add", "content": str(2 * i + 1)}, {"role": "assistant", "content": answer}]

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}], "chosen": reply(i, str(2 * i + 1)),
             "rejected": reply(i, f"It is {i * 3}, I think."), "thinking": False} for i in range(16)]
    pairs = folder / "pairs"
    pairs.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(pairs / "train.parquet")
    Dataset.from_list(rows[:4]).to_parquet(pairs / "test.parquet")
    offline = folder / "offline.jsonl"
    offline.write_text(json.dumps({"prompt": "Q: 1 + 1?\nA:", "chosen": "2", "rejected": "3"}) + "\n")
    return pairs, offline


def lora(model: str, **extra) -> ModelConfig:
    return ModelConfig(model_name_or_path=model, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       lora_target_modules=["all-linear"], **extra)


def upo_training(out: Path, batch: int, mode: str, offline: Path, **extra) -> UPOConfig:
    """UPO with fixed rollouts ranked by length, λ = 0.5, and 2 offline pairs a step with `mode` both."""
    return UPOConfig(output_dir=str(out), per_device_train_batch_size=batch, num_generations=4,
                     max_completion_length=8, rewards={"length_penalty": 1.0}, upo_lambda=0.5, upo_mode=mode,
                     upo_offline_ratio=2.0, upo_offline_dataset=str(offline) if mode == "both" else None,
                     upo_margin=0.0, **extra, **COMMON)


def main(model: str, data: Path, out: Path, stages: list[str]) -> None:
    pairs, offline = write_pairs(out / f"inputs-rank{RANK}")
    batch = 4 // WORLD  # per process: the global batch is 4 rows (SFT, DPO) or 4 rollouts of one prompt (UPO)
    # held-out evaluation after SFT and DPO, and DPO's preference accuracy before and after: on the main process, or
    # left to `posttrain run` when FSDP shards the weights (every forward is then a collective)
    held_out = dict(eval_dataset=str(data), eval_limit=4, eval_max_new_tokens=4, eval_batch_size=4)
    if "sft" in stages:
        stage = StageArguments(dataset_name=str(data), dataset_train_split="sft", max_train_samples=16,
                               tokenizer_name_or_path=model, **held_out)
        training = SFTConfig(output_dir=str(out / "sft"), per_device_train_batch_size=batch, max_length=128,
                             assistant_only_loss=True, **COMMON)
        record_engine(sft.main(stage, training, lora(model)), out / "sft")
    stage = StageArguments(dataset_name=str(pairs), dataset_test_split="test", tokenizer_name_or_path=model,
                           adapter_path=str(out / "sft"), **held_out)
    # the default recipe's loss: the `sft` term is a mean over the step's chosen tokens, whatever the processes.
    # `dpo_precomputed`: the same DPO with TRL's reference log-probs computed before training, which its main process
    # writes to a file every process opens; each process reads its own copy of the pairs (above), so each has its
    # datasets cache folder, as processes on two machines would
    for name, extra in (("dpo", {}), ("dpo_precomputed", {"precompute_ref_log_probs": True})):
        if name not in stages:
            continue
        training = DPOConfig(output_dir=str(out / name), per_device_train_batch_size=batch, max_length=192, beta=0.1,
                             loss_type=["sigmoid", "sft"], **extra, **COMMON)
        trainer = dpo.main(stage, training, lora(model))
        columns = trainer.train_dataset.column_names
        assert not extra or "ref_chosen_logps" in columns, columns
        record_engine(trainer, out / name)
    upo_stages(data, model, out, batch, offline, stages)


def upo_stages(prompts: Path, model: str, out: Path, batch: int, offline: Path, stages: list[str],
               done=record_engine, rollouts=None, **extra) -> None:
    """UPO with online and offline pairs (`upo`), then online pairs alone (`upo_online`), each continuing DPO's
    adapter on the `prompts` split of `prompts`, with fixed rollouts (`rollouts`, default `fixed_rollouts`);
    `done(trainer, folder)` after each, and each process's pair counts per step in `<stage>/pairs-rank<N>.json`.
    `extra`: more UPO settings."""
    UPOTrainer._generate_single_turn = rollouts or fixed_rollouts
    UPOTrainer._pair_logps = counting_pairs(UPOTrainer._pair_logps)
    for name, mode in (("upo", "both"), ("upo_online", "online")):
        if name not in stages:
            continue
        PAIR_COUNTS.clear()
        stage = StageArguments(dataset_name=str(prompts), dataset_train_split="prompts", tokenizer_name_or_path=model,
                               adapter_path=str(out / "dpo"))
        training = upo_training(out / name, batch, mode, offline, **extra)
        trainer = upo.main(stage, training, lora(model), CurriculumArguments())
        (out / name / f"pairs-rank{RANK}.json").write_text(json.dumps(PAIR_COUNTS))
        done(trainer, out / name)


def run_script(main, gloo_timeout_s: int | None = None) -> None:
    """`main(MODEL-or-ARCH, DATA, OUT, STAGES)` from the command line, one thread a process, FSDP on CPU when asked.
    With `gloo_timeout_s`, a collective one process never joins fails after that long, with a traceback."""
    torch.set_num_threads(1)
    if os.environ.get("FSDP_ON_CPU") == "1":
        force_fsdp_on_cpu()
    if gloo_timeout_s and WORLD > 1:
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=gloo_timeout_s))
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(",") if len(sys.argv) > 4 else
         ["sft", "dpo", "dpo_precomputed", "upo", "upo_online"])
    end_processes()


if __name__ == "__main__":
    run_script(main)
