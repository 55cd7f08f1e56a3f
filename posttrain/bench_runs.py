"""One stage of `posttrain bench` in one process: plain TRL and the posttrain stage on the same model, data and
arguments, run in the order the caller gives (it alternates them), each on a freshly loaded model.

    python -m posttrain.bench_runs SPEC.json OUT.json      # launched by `posttrain bench` as the pipeline launches stages

One process for all runs of a stage: both sides share its threads and environment, and imports are paid once.
A run is measured by what TRL itself records: `train_runtime` (`Trainer.train()`'s loop after its setup, first step
included) and `num_tokens` (non-padding tokens; prompt + completion for GRPO); also the process's CPU seconds over
that same span, which a busy machine disturbs far less than wall time (`TrainCpuTime`). Peak memory is
`torch.cuda.max_memory_allocated` on a GPU; on CPU it is the largest resident set sampled every 20 ms during the run
(a process's `ru_maxrss` cannot be reset between runs; memory is handed back to the OS between runs so the next one
starts low). One unrecorded warm-up step of each (row, column) runs first, so that no column pays one-time costs (the
process's, and its own code path's: Liger's kernel compilation, say) that the others do not, then the first run once
in full, unrecorded.

The plain-TRL side is what a user's own script would do: `from_pretrained`, `PeftModel.from_pretrained` for a
continued adapter, `load_dataset("parquet")`, the TRL config built from the same flat arguments, and the trainer.
"""

import ctypes
import dataclasses
import gc
import json
import shutil
import sys
import threading
import time
from pathlib import Path

from .io import write_json

# UPO's GRPO step in plain TRL: GRPOConfig gets the same arguments minus these, and the rewards as positional weights
UPO_ONLY = {"upo_lambda", "upo_beta", "upo_margin", "upo_pairs_per_prompt", "upo_mode", "upo_offline_dataset",
            "upo_offline_ratio", "rewards", "normalize_rewards_by", "phases"}


class PeakMemory:
    """Peak memory of the block: CUDA allocator peak on a GPU, largest sampled RSS on CPU (bytes)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak, self._stop = 0, threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        import psutil

        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False


def release_memory() -> None:
    """Free the previous run's tensors and hand the heap back to the OS, so RSS peaks are per run."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: peaks may then include the previous run's freed heap
            pass


def posttrain_stage(stage: str, args: dict):
    """The posttrain stage's own `main()`, parsed by the stage's own parser, exactly as `posttrain run` calls it."""
    from .stages import dpo, sft, upo

    module = {"sft": sft, "dpo": dpo, "grpo": upo, "upo": upo}[stage]
    return module.main(*module.make_parser().parse_dict(args))


def plain_trl(stage: str, args: dict):
    """The same stage written directly against TRL, as a user's short script would."""
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, ModelConfig, SFTConfig, SFTTrainer, get_peft_config

    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer_name_or_path"])
    model_config = ModelConfig(**_subset(ModelConfig, args))
    model = plain_model(model_config, args)
    peft_config = None
    if args.get("adapter_path"):  # TRL freezes a copy of a continued adapter as the reference
        model = PeftModel.from_pretrained(model, args["adapter_path"], is_trainable=True)
    else:
        peft_config = get_peft_config(model_config)
    data_file = f"{args['dataset_name']}/{args.get('dataset_train_split', 'train')}.parquet"
    dataset = load_dataset("parquet", data_files=data_file, split="train")
    common = dict(model=model, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    if stage == "sft":
        trainer = SFTTrainer(args=SFTConfig(**_subset(SFTConfig, args)), **common)
    elif stage == "dpo":
        trainer = DPOTrainer(args=DPOConfig(**_subset(DPOConfig, args)), **common)
    else:
        from .rewards import reward_function

        config = GRPOConfig(**_subset(GRPOConfig, {k: v for k, v in args.items() if k not in UPO_ONLY}),
                            reward_weights=list(args["rewards"].values()))
        trainer = GRPOTrainer(reward_funcs=[reward_function(name) for name in args["rewards"]], args=config, **common)
    trainer.train()
    return trainer


def plain_model(model_config, args: dict):
    """The base model as the stage loads it from the same arguments (`--plain dtype=bfloat16` reaches both sides):
    `ModelConfig`'s dtype, attention and revision."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_config.dtype if model_config.dtype in ("auto", None) else getattr(torch, model_config.dtype)
    return AutoModelForCausalLM.from_pretrained(
        model_config.model_name_or_path, dtype=dtype, attn_implementation=model_config.attn_implementation,
        revision=model_config.model_revision, trust_remote_code=bool(args.get("trust_remote_code")))


def _subset(cls, args: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in args.items() if k in names}


class TrainCpuTime:
    """CPU seconds the process spends in `Trainer.train()`'s training loop, whoever calls it: with one thread, the
    work itself, which other processes sharing the cores barely change (wall time on a busy machine measures them
    too). Over `train_runtime`'s own span (from the train-begin callback, after the dataloader, optimizer and
    `accelerator.prepare`, to train-end), so that the per-CPU-second ratio times what the wall-clock one does: over the
    whole `train()`, that setup (about 0.25 s here) pulled a short run's ratio towards 1 (2.7x wall, 1.2x CPU)."""

    def __enter__(self):
        from transformers import Trainer, TrainerCallback

        self.seconds, self._original = 0.0, Trainer.train
        original, record = Trainer.train, self

        class Span(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.start = time.process_time()

            def on_train_end(self, args, state, control, **kwargs):
                record.seconds += time.process_time() - self.start

        def train(trainer, *args, **kwargs):
            trainer.add_callback(Span())
            return original(trainer, *args, **kwargs)

        Trainer.train = train
        return self

    def __exit__(self, *exc):
        from transformers import Trainer

        Trainer.train = self._original
        return False


def measure(stage: str, run: dict) -> dict:
    """Train once and return what the table needs."""
    release_memory()
    started = time.time()
    with PeakMemory() as memory, TrainCpuTime() as cpu:
        trainer = (plain_trl if run["side"] == "trl" else posttrain_stage)(stage, run["args"])
    history = trainer.state.log_history
    train = next(entry for entry in reversed(history) if "train_runtime" in entry)
    tokens = max((entry["num_tokens"] for entry in history if "num_tokens" in entry), default=0)
    # pairs the DPO term scored per generation batch (UPO only): 0 means a `upo` run timed no DPO term
    pairs = [entry.get("upo/pairs_online", 0) + entry.get("upo/pairs_offline", 0) for entry in history
             if "upo/pairs_online" in entry or "upo/pairs_offline" in entry]
    result = {"row": stage, "column": run["column"], "repeat": run["repeat"], "train_runtime_s": train["train_runtime"],
              "steps": trainer.state.global_step, "tokens": tokens, "peak_memory_bytes": memory.peak,
              "memory_kind": "cuda_max_allocated" if memory.cuda else "rss", "train_cpu_s": round(cpu.seconds, 4),
              "wall_s": round(time.time() - started, 1)}
    if stage == "upo":
        result["upo_pairs"] = sum(pairs) / len(pairs) if pairs else 0.0
    del trainer
    shutil.rmtree(run["args"]["output_dir"], ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    import torch

    from .bench_summary import device_name
    from .devices import parameter_count

    spec = json.loads(Path(argv[0]).read_text())
    if not torch.cuda.is_available():
        torch.set_num_threads(spec["threads"])  # both sides; the stage's own set_threads applies the same number
    # one unrecorded step of each (row, column) first: one-time costs (allocator, kernels compiled on first use,
    # autocast caches) go there. On the GPU a column's first run had paid them: SFT defaults 3.9 s, then 2.2 and 2.2
    warm = {}
    for run in spec["runs"] if spec.get("warmup", True) else []:  # `--no-warmup`: none
        warm.setdefault((run["row"], run["column"]), run)
    for (row, column), run in warm.items():
        print(f"[bench] warm-up: one step of {row} {column}…", flush=True)
        measure(row, {**run, "args": {**run["args"], "max_steps": 1, "logging_steps": 1}})
    # and the first run once in full, unrecorded: on the GPU, runs still got faster through a worker after those
    # steps (SFT plain TRL 7.0 s first, 5.1 s last; 2026-12-04), and the first run is always plain TRL's (a one-step
    # run was just warmed up in full)
    if warm and spec["runs"][0]["args"].get("max_steps") != 1:
        first = spec["runs"][0]
        print(f"[bench] warm-up: {first['row']} {first['column']} in full…", flush=True)
        measure(first["row"], first)
    # what `posttrain bench --from-runs` needs to make the table from these runs alone, e.g. when a bench was cut short
    device, peak = device_name()
    params = parameter_count(spec["runs"][0]["args"]["model_name_or_path"]) if spec["runs"] else 0
    about = {"device": device, "peak_tflops": peak, "parameters": params}
    results = []
    for index, run in enumerate(spec["runs"], 1):
        print(f"[bench] {index}/{len(spec['runs'])} {run['row']} {run['column']} (repeat {run['repeat']})…",
              flush=True)
        results.append(measure(run["row"], run))
        print(f"[bench] {run['row']} {run['column']}: {results[-1]['train_runtime_s']:.1f} s training, "
              f"{results[-1]['tokens']} tokens, peak {results[-1]['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
        write_json(argv[1], {"threads": spec["threads"], **about, "runs": results})
    return 0


if __name__ == "__main__":
    from . import skip_final_collection

    skip_final_collection()
    sys.exit(main(sys.argv[1:]))
