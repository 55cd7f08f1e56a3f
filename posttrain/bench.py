"""`posttrain bench`: plain TRL and the posttrain stages side by side, back to back, on one model, data and arguments.

    posttrain bench                                   # the default model (SmolLM2-135M-Instruct), CPU or GPU
    posttrain bench --model shape:qwen2.5-1.5b        # random weights in that shape: no Hub needed (GPU)
    posttrain bench --stages sft,dpo --steps 6 --repeats 3
    posttrain bench --from-runs outputs/bench         # the table of the runs a cut-short bench finished
    posttrain bench --variant bf16:dtype=bfloat16     # one more column: our defaults plus these arguments
    posttrain bench --data chat                       # SFT and DPO on real conversations of varied length

Rows: `sft`, `dpo`, `grpo` (plain `GRPOTrainer` vs our UPO with `upo_lambda: 0`) and `upo` (`upo_lambda: 0.5`, set
against the same plain GRPO step). Columns:

- `trl`: a plain TRL script with the bench arguments and TRL's defaults for everything else;
- `equal`: the posttrain stage with exactly the same arguments (TRL's resolved defaults written out, and for the RL
  rows GRPO's dropout and rollout sampling, so none of our defaults applies): posttrain's code at TRL's arguments. Its
  CPU code paths (the LM head, the fused LoRA update) run there too, so this column shows their gain net of any cost
  the stage adds, not that cost alone;
- `defaults`: the posttrain stage with the bench arguments only, i.e. what a recipe gets without tuning
  (`devices.device_defaults` and `devices.speed_defaults`, the same functions the pipeline uses);
- one more per `--variant NAME:KEY=VALUE,...`: `defaults` with those arguments over it (a candidate default, measured
  side by side before it becomes one).

Every (stage, column) runs `--repeats` times; each repeat runs the columns in the opposite order of the previous one,
and ratios are taken within a repeat, so a load change on a shared machine hits both sides of a ratio alike. It
asserts nothing: it prints a table, and writes bench.json and bench.md.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .bench_inputs import SHAPES, resolve_bench_model, starting_adapter, write_bench_data
from .bench_summary import device_name, markdown_table, summarize
from .console import console
from .io import write_json, write_text

ROWS = ("sft", "dpo", "grpo", "upo")
# `hackable_length` (words, a little weight) spreads the rewards within every prompt's rollouts whatever the model:
# on random weights (`tiny:`, `shape:`) the other two are the same for every rollout, UPO then mines no pair, and the
# `upo` row would time a GRPO step without its DPO term. Both sides of every RL ratio score the same three rewards
REWARDS = {"accuracy": 1.0, "think_format": 0.5, "hackable_length": 0.1}


@dataclass
class BenchOptions:
    model: str = "default"
    stages: tuple[str, ...] = ROWS
    steps: int = 6
    repeats: int = 3
    dpo_repeats: int | None = None
    rl_steps: int = 2
    rl_repeats: int = 1
    batch_size: int = 8
    max_length: int = 256
    num_generations: int = 8
    max_completion_length: int = 48
    threads: int | None = None
    variants: dict[str, dict] | None = None  # column name -> arguments over `defaults`
    plain: dict | None = None  # arguments over TRL's defaults for the `trl` and `equal` columns (both sides alike)
    data: str = "tasks"  # or "chat"
    warmup: bool = True  # an unrecorded step of each column first (`bench_runs`); off for a quick check that it runs
    work: str = "outputs/bench"
    out: str = "bench.json"


# ---------------------------------------------------------------------------------------------------------- inputs
def prepare_inputs(model: Path, work: Path, options: BenchOptions) -> dict:
    """Tokenizer (with the default recipe's chat template), arithmetic chat data for every row, and a starting
    adapter that DPO and UPO continue (as in a real run, where they continue the previous stage's)."""
    from .datajobs import run_job
    from .models import load_tokenizer

    tokenizer_dir = work / "tokenizer"
    tokenizer = load_tokenizer(model, "chatml")
    tokenizer.save_pretrained(tokenizer_dir)
    tasks = work / "data" / "tasks"
    rows = max(options.steps, options.rl_steps) * options.batch_size
    if not (tasks / "prompts.parquet").is_file():
        run_job("build_verifiable_tasks", {"n_train": max(64, rows), "n_test": 8, "domains": ["arithmetic"],
                                           "seed": 0}, tasks)
    data = work / ("data" if options.data == "tasks" else f"data-{options.data}")
    write_bench_data(tasks, data, tokenizer, options.data, options.max_length)
    return {"model": str(model), "tokenizer": str(tokenizer_dir), "data": str(data),
            "adapter": str(starting_adapter(model, work / "adapter"))}


# ---------------------------------------------------------------------------------------------------------- arguments
def bench_args(row: str, inputs: dict, options: BenchOptions) -> dict:
    """The arguments both sides get: model, data, steps, batch, lengths, LoRA. Nothing else is set."""
    rl = row in ("grpo", "upo")
    steps = options.rl_steps if rl else options.steps
    args = {"model_name_or_path": inputs["model"], "tokenizer_name_or_path": inputs["tokenizer"],
            "max_steps": steps, "per_device_train_batch_size": options.batch_size, "logging_steps": steps,
            "save_strategy": "no", "report_to": "none", "seed": 0, "use_peft": True, "lora_r": 16, "lora_alpha": 32,
            "lora_dropout": 0.0, "lora_target_modules": ["all-linear"], "dataset_train_split": "train"}
    if row == "sft":
        return {**args, "dataset_name": f"{inputs['data']}/sft", "max_length": options.max_length,
                "assistant_only_loss": True, "learning_rate": 2e-4}
    args["adapter_path"] = inputs["adapter"]  # DPO and UPO continue an adapter, whose frozen copy is the reference
    if row == "dpo":
        return {**args, "dataset_name": f"{inputs['data']}/pairs", "max_length": options.max_length, "beta": 0.1,
                "learning_rate": 5e-5}
    # every rollout runs to max_completion_length, so both sides generate the same number of tokens
    return {**args, "dataset_name": f"{inputs['data']}/prompts", "rewards": REWARDS,
            "num_generations": options.num_generations, "max_completion_length": options.max_completion_length,
            "generation_kwargs": {"min_new_tokens": options.max_completion_length}, "temperature": 1.0,
            "learning_rate": 3e-5, "upo_lambda": 0.5 if row == "upo" else 0.0}


def column_args(row: str, column: str, args: dict, variants: dict | None = None, plain: dict | None = None) -> dict:
    """`trl` and `equal`: the bench arguments plus TRL's own defaults written out for every key posttrain would
    otherwise choose, and `plain` over them (`--plain`: e.g. `bf16=false` on a CPU that emulates bf16, which a plain
    script's user would set too); `defaults`: posttrain's choices (the pipeline's functions) over the bench
    arguments; a variant: `defaults` with its own arguments over them."""
    from .devices import device_defaults, has_cuda, speed_defaults

    if column == "defaults" or column in (variants or {}):
        defaults = {**device_defaults(args), **speed_defaults(row, args["model_name_or_path"], args), **args}
        return {**defaults, **(variants or {}).get(column, {})}
    trl_defaults = {"bf16": True, "gradient_checkpointing": True, "use_liger_kernel": False}
    if row in ("grpo", "upo"):  # GRPO's behaviour where UPOConfig's defaults differ: dropout as the model has it,
        # rollouts sampled through the unmerged adapter
        trl_defaults.update(disable_dropout=False, merged_rollouts=False)
    return {**trl_defaults, **({} if has_cuda() else {"use_cpu": True}), **args, **(plain or {})}


def columns_for(row: str, variants: dict | None = None) -> tuple[str, ...]:
    base = ("equal", "defaults") if row == "upo" else ("trl", "equal", "defaults")
    return (*base, *(variants or {}))


def parse_variant(text: str) -> tuple[str, dict]:
    """`NAME:KEY=VALUE,KEY=VALUE` -> (NAME, {KEY: VALUE}), each value read as a YAML scalar (`true`, `0.0001`,
    `bfloat16`; YAML reads `1e-4` as text)."""
    from .errors import UserError

    expected = f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], e.g. bf16w:dtype=bfloat16"
    name, _, pairs = text.partition(":")
    if not name.strip():
        raise UserError(expected)
    arguments = parse_arguments(pairs, expected)
    if name.strip() in ("trl", "equal", "defaults"):
        raise UserError(f"--variant {text!r}: '{name.strip()}' is a column already; give the variant another name")
    return name.strip(), arguments


def parse_arguments(pairs: str, expected: str) -> dict:
    """`KEY=VALUE,KEY=VALUE` -> {KEY: VALUE}, each value a YAML scalar; a UserError saying `expected` otherwise."""
    import yaml

    from .errors import UserError

    items = [item.partition("=") for item in pairs.split(",") if item.strip()]
    if not items or any(not key.strip() or not sep for key, sep, _ in items):
        raise UserError(expected)
    return {key.strip(): yaml.safe_load(value) for key, _, value in items}


def plan_runs(rows: list[str], inputs: dict, options: BenchOptions, work: Path) -> list[dict]:
    """Runs of one worker process, alternating the column order from one repeat to the next. The `upo` row without
    the `grpo` one still gets plain GRPO's run: its ratios are taken over that step."""
    runs = []
    repeats = {"sft": options.repeats, "dpo": options.dpo_repeats or options.repeats}.get(rows[0], options.rl_repeats)
    order = [(row, column) for row in rows for column in columns_for(row, options.variants)]
    if "upo" in rows and "grpo" not in rows:
        order.insert(0, ("grpo", "trl"))
    for repeat in range(repeats):
        for row, column in order if repeat % 2 == 0 else order[::-1]:
            args = column_args(row, column, bench_args(row, inputs, options), options.variants, options.plain)
            args["output_dir"] = str(work / "runs" / f"{row}-{column}-{repeat}")
            runs.append({"row": row, "column": column, "repeat": repeat,
                         "side": "trl" if column == "trl" else "posttrain", "args": args})
    return runs


# ---------------------------------------------------------------------------------------------------------- running
def run_worker(runs: list[dict], threads: int, work: Path, name: str, warmup: bool = True) -> list[dict]:
    """One process for these runs, started as the pipeline starts a stage's: as `accelerate launch` would start it,
    without the launcher in between (`devices.direct_command`, about 1.5 s of imports less), else through the
    launcher; its progress streams through."""
    from .devices import accelerate_launch_args, direct_command

    spec, out = work / f"{name}.spec.json", work / f"{name}.runs.json"
    write_json(spec, {"threads": threads, "runs": runs, "warmup": warmup})
    out.unlink(missing_ok=True)
    flags = accelerate_launch_args(None, 1)
    if "--num_cpu_threads_per_process" in flags:  # the bench's thread count, for both sides
        flags[flags.index("--num_cpu_threads_per_process") + 1] = str(threads)
    script = ["-m", "posttrain.bench_runs", str(spec), str(out)]
    command, env = direct_command(flags, script) or ([sys.executable, "-m", "accelerate.commands.launch", *flags,
                                                      *script], os.environ)
    code = subprocess.call(command, env={**env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    done = json.loads(out.read_text())["runs"] if out.is_file() else []
    if code != 0:
        console.print(f"[red]bench worker '{name}' failed (exit code {code}); {len(done)} of {len(runs)} runs kept")
    return done


def run_bench(options: BenchOptions) -> dict:
    """Prepare the inputs, run the SFT/DPO rows and the RL rows in one worker process each, write the results."""
    from .devices import cpu_threads, parameter_count

    work = Path(options.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # an earlier bench's runs (another model, other rows or options): `--from-runs` would mix them into this one's table
    for stale in work.glob("*.runs.json"):
        stale.unlink()
    started = time.time()
    with console.status("preparing the model, data and starting adapter…"):
        model = resolve_bench_model(options.model, work)
        inputs = prepare_inputs(model, work, options)
    threads = options.threads or cpu_threads(1)
    runs = []
    try:
        for group in (["sft"], ["dpo"], ["grpo", "upo"]):
            rows = [row for row in group if row in options.stages]
            if rows:
                console.rule(f"bench: {', '.join(rows)}")
                runs += run_worker(plan_runs(rows, inputs, options, work), threads, work, "-".join(rows),
                                   options.warmup)
    except KeyboardInterrupt:  # the same command again starts over and deletes the finished runs: say how to keep them
        finished = sum(len(json.loads(p.read_text()).get("runs", [])) for p in work.glob("*.runs.json"))
        if finished:
            console.print(f"[yellow]{finished} finished runs are in {work}: `posttrain bench --from-runs {work}` "
                          f"makes their table (running this bench again starts over, without them)[/yellow]")
        raise
    device, peak = device_name()
    result = {"model": options.model, "model_path": str(model), "device": device, "threads": threads,
              "options": options.__dict__, "wall_s": round(time.time() - started, 1)}
    return write_results(result, runs, parameter_count(model), peak, options.out)


def write_results(result: dict, runs: list[dict], n_params: int, peak_tflops: float | None, out) -> dict:
    """The table of `runs` added to `result`, written to `out` (.json) and printed and written as Markdown (.md)."""
    table = summarize(runs, n_params, peak_tflops)
    device, threads = result["device"], result.get("threads") or 1
    label = device if device != "CPU" else f"CPU, {threads} thread" + ("s" if threads > 1 else "")
    if not result.get("options", {}).get("warmup", True):  # `--no-warmup`: the first runs paid one-time costs
        label += ", no warm-up steps"
    markdown = markdown_table(table, label)
    result = {**result, "table": table, "runs": runs}
    write_json(out, result, default=str)
    write_text(Path(out).with_suffix(".md"), markdown)
    console.print(markdown, markup=False, highlight=False)
    wall = f" ({result['wall_s']:.0f} s)" if result.get("wall_s") else ""
    console.print(f"wrote {out} and {Path(out).with_suffix('.md')}{wall}")
    return result


def results_from_runs(folder: Path, out) -> dict:
    """The table of whatever runs the workers finished, from their `*.runs.json` in `folder` (a bench's `--work`
    folder, or where `bench/gpu.sh` copied them): for a bench that was cut short or whose last worker failed."""
    from .errors import UserError

    parts = [json.loads(path.read_text()) for path in sorted(folder.glob("*.runs.json"))]
    parts = [part for part in parts if part.get("runs")]
    if not parts:
        raise UserError(f"--from-runs {folder}: no *.runs.json with finished runs there (a bench's --work folder, "
                        "or the folder bench/gpu.sh copied them to)")
    first = parts[0]
    runs = sorted((run for part in parts for run in part["runs"]), key=lambda run: ROWS.index(run["row"]))
    result = {"model": None, "device": first.get("device", "unknown"), "threads": first.get("threads"),
              "from_runs": str(folder)}
    return write_results(result, runs, first.get("parameters", 0), first.get("peak_tflops"), out)


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="plain TRL vs posttrain, side by side: tokens/s, steps/s, memory, ratios")
    bench.add_argument("--model", default="default", help="'default' (the default recipe's model), shape:<name> "
                       f"(random weights: {', '.join(SHAPES)}), tiny:<arch>, a folder or a cached Hub id")
    bench.add_argument("--stages", default=",".join(ROWS), help="rows to run, from sft,dpo,grpo,upo")
    bench.add_argument("--steps", type=int, default=6, help="optimizer steps per SFT/DPO run")
    bench.add_argument("--repeats", type=int, default=3, help="SFT (and DPO) repeats (column order alternates)")
    bench.add_argument("--dpo-repeats", type=int, help="DPO repeats, when not --repeats (its steps are the slowest)")
    bench.add_argument("--rl-steps", type=int, default=2, help="optimizer steps per GRPO/UPO run")
    bench.add_argument("--rl-repeats", type=int, default=1)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--max-length", type=int, default=256)
    bench.add_argument("--num-generations", type=int, default=8)
    bench.add_argument("--max-completion-length", type=int, default=48)
    bench.add_argument("--threads", type=int, help="CPU threads for both sides (default: OMP_NUM_THREADS or all cores)")
    bench.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                       help="one more column: our defaults with these stage arguments over them (repeatable)")
    bench.add_argument("--plain", metavar="KEY=VALUE,...",
                       help="arguments over TRL's defaults for the plain script and the equal column alike, e.g. "
                       "bf16=false on a CPU that emulates bf16")
    bench.add_argument("--data", choices=("tasks", "chat"), default="tasks",
                       help="SFT and DPO rows: the arithmetic tasks' (short, about 58 tokens) or real conversations "
                       "and preference dialogues of varied length (chat); RL rows are the tasks' prompts either way")
    bench.add_argument("--no-warmup", dest="warmup", action="store_false",
                       help="skip the unrecorded warm-up steps: a quick check that the bench runs, whose times then "
                       "include one-time costs (the first column's imports, say)")
    bench.add_argument("--work", default="outputs/bench", help="model, data and adapter cache, run folders")
    bench.add_argument("--out", default="bench.json", help="results; the Markdown table goes next to it (.md)")
    bench.add_argument("--from-runs", metavar="DIR", help="run nothing: make the table from the *.runs.json in DIR "
                       "(the runs a cut-short bench finished)")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .errors import UserError

    if args.from_runs:
        results_from_runs(Path(args.from_runs), args.out)
        return 0
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in ROWS]
    if unknown or not stages:  # none: an empty table would replace the results already in --out
        raise UserError(f"--stages: {'unknown row(s) ' + ', '.join(unknown) if unknown else 'no row given'}; "
                        f"choose from {', '.join(ROWS)}")
    plain = parse_arguments(args.plain, f"--plain {args.plain!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. "
                            "bf16=false") if args.plain else None
    run_bench(BenchOptions(model=args.model, stages=stages, steps=args.steps, repeats=args.repeats,
                           dpo_repeats=args.dpo_repeats,
                           rl_steps=args.rl_steps, rl_repeats=args.rl_repeats, batch_size=args.batch_size,
                           max_length=args.max_length, num_generations=args.num_generations,
                           max_completion_length=args.max_completion_length, threads=args.threads,
                           variants=dict(parse_variant(text) for text in args.variant) or None,
                           plain=plain, data=args.data, warmup=args.warmup, work=args.work, out=args.out))
    return 0
