"""`posttrain`: run a recipe, evaluate, build data, check the environment.

    posttrain run [RECIPE] [section.key=value ...]   # default recipe: recipes/text/smollm2-135m.yaml
    posttrain run RECIPE --num-machines 2 --machine-rank $RANK --main-process-ip $HOST   # on each machine
    posttrain eval outputs/<run> [--stage sft]
    posttrain ablate recipes/text/smollm2-135m-ablation.yaml
    posttrain report outputs/<run> [--compare outputs/<other> ...]
    posttrain data build_verifiable_tasks --out data/verifiable
    posttrain export outputs/<run> [--stage dpo] [--merge] [--push-to-hub ORG/NAME]
    posttrain chat outputs/<run> [--stage sft] [--thinking on|off]
    posttrain doctor
    posttrain bench [--model MODEL] [--stages sft,dpo,grpo,upo]   # plain TRL vs posttrain, side by side

User mistakes (a missing file, a bad key, an unreachable model) print one paragraph and exit with code 2; a
traceback means a bug in posttrain.
"""

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from . import skip_final_collection
from .configs import EvalArguments, add_dataclass_arguments, at_least, given_fields
from .console import console
from .errors import Terminated, UserError, make_folder, terminate_on_sigterm


def cmd_run(args) -> int:
    from .devices import check_engine_runs_here
    from .pipeline import Pipeline
    from .recipe import load_recipe

    recipe_path = next((a for a in args.items if "=" not in a), None)
    overrides = [a for a in args.items if a != recipe_path]
    nodes = None if args.dry_run else machines(args)
    try:
        recipe = load_recipe(recipe_path, overrides)
        check_stage_flags(list(recipe.stages), args, recipe.path)
        args.accelerate_config = found_accelerate_config(args.accelerate_config, recipe)
        check_engine_runs_here(args.accelerate_config or recipe.accelerate_config)  # before data jobs, a dry run
    except UserError as exc:
        if nodes and nodes.machine_rank > 0:  # checked here as on machine 0: a reward it imports, an engine it needs
            tell_machine_0(recipe_path, overrides, args.output_dir, nodes, exc)
        raise
    console.print(f"[bold]recipe[/bold] {recipe.path} · stages: {' → '.join(recipe.stages)}")
    if args.dry_run:
        import yaml

        from .recipe_files import check_recipe_files

        check_recipe_files(recipe)
        pipeline = Pipeline(recipe, args.output_dir)
        for stage, stage_args in recipe.stages.items():
            console.rule(stage)
            console.print(yaml.safe_dump(pipeline.substitute(stage_args), sort_keys=False))
        return 0
    if nodes and nodes.machine_rank > 0:  # machine 0 prepares and launches; this one joins its stages
        from .nodes import follow
        from .pipeline import run_dir

        return follow(run_dir(recipe, args.output_dir).resolve(), nodes)
    pipeline = Pipeline(recipe, args.output_dir, args.accelerate_config, args.num_processes, nodes=nodes)
    pipeline.run(only=args.only, start=args.start, until=args.until)
    return 0


def tell_machine_0(recipe_path, overrides: list[str], output_dir, nodes, exc: UserError) -> None:
    """A follower whose own checks of the recipe failed says why in the run folder (`nodes.report_failure`), so that
    machine 0 stops too rather than wait for it; nothing when the recipe does not even name its run folder (machine 0,
    reading the same recipe, then fails alike)."""
    from .nodes import report_failure
    from .recipe import recipe_file
    from .recipe_yaml import apply_overrides, read_recipe

    try:
        name = apply_overrides(read_recipe(recipe_file(recipe_path)), overrides, str(recipe_path))["name"]
        report_failure((Path(output_dir) / name).resolve(), nodes, str(exc))
    except (UserError, KeyError, TypeError, OSError):
        pass


def found_accelerate_config(value: str | None, recipe) -> str | None:
    """--accelerate-config found as the recipe's `accelerate_config:` is (here, beside the recipe, or in the
    repository), so the README's `recipes/accelerate/*.yaml` work from any folder as its recipe paths do."""
    from .recipe import resolve_relative

    return str(resolve_relative(value, recipe.path)) if value else None


def check_stage_flags(order: list[str], args, path) -> None:
    """--only, --from and --until name stages of the recipe, and --until none before the stage to run: checked before
    a dry run says all is well and before a run builds any data."""
    for flag, stage in (("--only", args.only), ("--from", args.start), ("--until", args.until)):
        if stage and stage not in order:
            raise UserError(f"{flag}: stage '{stage}' is not in recipe {path} (stages: {', '.join(order)})")
    for flag, stage in (("--only", args.only), ("--from", args.start)):
        if stage and args.until and order.index(stage) > order.index(args.until):
            raise UserError(f"{flag} {stage}: the stage comes after --until {args.until} in recipe {path} "
                            f"({' → '.join(order)}), so nothing would run it")


def machines(args):
    """This machine's place in a multi-machine run, or None on one machine."""
    if args.num_machines == 1 and args.machine_rank == 0:
        return None
    from .nodes import Nodes

    return Nodes(args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)


def cmd_ablate(args) -> int:
    from .ablate import run_ablation
    from .devices import check_engine_runs_here
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    args.accelerate_config = found_accelerate_config(args.accelerate_config, recipe)
    check_engine_runs_here(args.accelerate_config or recipe.accelerate_config)  # before the shared data jobs, as run
    only = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants is not None else None
    if only == []:  # `--variants ""` (an empty shell variable) ran every variant
        raise UserError(f"--variants {args.variants!r} names no variant; expected some of the recipe's, e.g. "
                        "--variants grpo,upo_online (leave the option out to run them all)")
    run_ablation(recipe, args.output_dir, args.accelerate_config, args.num_processes, args.seeds, only, args.until)
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import run_saved
    from .recipe import resolve_relative
    from .runs import check_not_run_file, eval_target

    given = given_fields(args, EvalArguments)
    if given.get("dataset"):  # found as a recipe's files are: from here, else in the repository or the installed
        # package (the README's data_prep/sources/arithmetic_transfer.jsonl from any folder); a Hub id stays
        given["dataset"] = str(resolve_relative(given["dataset"], Path.cwd() / "eval"))
    if args.run and args.model:
        raise UserError(f"give a run folder ({args.run}) or --model ({args.model}), not both: a run's stage is "
                        "evaluated on the run's own base model (--adapter may still replace its adapter)")
    if args.run:
        ref, settings = eval_target(args.run, args.stage, given)
        if args.out:
            check_not_run_file(args.out, ref.run)
        ref.check_base_model()
        model, tokenizer, adapter, remote = ref.base_model, ref.tokenizer, args.adapter or ref.adapter, \
            ref.trust_remote_code
    elif args.model and given.get("dataset"):
        settings = EvalArguments(**given)
        from .models import adapter_tokenizer

        model, tokenizer, adapter, remote = args.model, adapter_tokenizer(args.adapter), args.adapter, False
    else:
        raise UserError("give a run folder (posttrain eval outputs/<run>) or --model and --dataset")
    if args.out:
        if Path(args.out).is_dir():  # else found only after the evaluation, by the rename that writes the file
            raise UserError(f"--out {args.out}: it is a folder; give the path of the metrics JSON file to write")
        make_folder(Path(args.out).parent, "the folder for --out")
    metrics = run_saved(settings, model, tokenizer, adapter, args.out, trust_remote_code=remote)
    if args.out:
        from .stats import format_eval_accuracy

        console.print(f"accuracy {format_eval_accuracy(metrics)} · format {metrics['format']:.1%} · n={metrics['n']}")
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    path = build_report(args.run, args.compare)
    console.print(f"report: {path}\n        {path.with_suffix('.md')} (+ {path.parent / 'report_files'}/)")
    return 0


def cmd_data(args) -> int:
    from .datajobs import list_jobs, run_command

    if args.job in (None, "list"):
        if args.help:
            args.data_parser.print_help()
        console.print("data jobs: " + ", ".join(list_jobs()["jobs"]) + ", validate")
        return 0
    return run_command(args.job, args.rest)


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    return run_doctor()


def cmd_export(args) -> int:
    from .errors import disk_full_error, is_disk_full
    from .export import ExportRequest, run_export

    try:
        run_export(ExportRequest(run=args.run, stage=args.stage, merge=args.merge, dtype=args.dtype, out=args.out,
                                 overwrite=args.overwrite, license=args.license, push_to_hub=args.push_to_hub,
                                 private=args.private, revision=args.revision, force=args.force))
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, UserError):
            raise disk_full_error(exc, "the export", near=args.out or args.run, resumes=False) from exc
        raise
    return 0


def cmd_chat(args) -> int:
    from .chat import run_chat

    run_chat(args.run, args.stage, args.thinking, args.max_new_tokens, system=args.system,
             model_path=args.model and user_path(args.model), adapter=args.adapter and user_path(args.adapter))
    return 0


def user_path(text: str) -> str:
    """A path flag with `~` expanded: the shell leaves `--output-dir=~/runs` as written, which would make a folder
    named `~` in the working directory."""
    return str(Path(text).expanduser())


LAST_STAGE = "the last finished one, leaving out stages trained from a stage since retrained or gate-rejected"


def make_parser() -> argparse.ArgumentParser:
    from .bench import add_parser as add_bench_parser

    parser = argparse.ArgumentParser(prog="posttrain", description="SFT → DPO → UPO post-training with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_run_parser, add_ablate_parser, add_eval_parser, add_report_parser, add_data_parser,
                add_doctor_parser, add_export_parser, add_chat_parser, add_bench_parser):
        add(sub)
    return parser


def add_run_parser(sub) -> None:
    run = sub.add_parser("run", help="run a recipe (default: the SmolLM2-135M recipe)")
    run.add_argument("items", nargs="*", metavar="[RECIPE] [KEY=VALUE]",
                     help="recipe file, then overrides such as stages.sft.max_steps=10")
    run.add_argument("--output-dir", default="outputs", type=user_path, help="runs go to OUTPUT_DIR/<recipe name>/")
    which = run.add_mutually_exclusive_group()  # --only with --from would run one stage, silently not the rest
    which.add_argument("--only", metavar="STAGE", help="(re)run this stage only; earlier stages must be finished")
    which.add_argument("--from", dest="start", metavar="STAGE", help="(re)run from this stage on")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (--until sft: the data, the base "
                     "evaluation and SFT)")
    run.add_argument("--accelerate-config", help="accelerate config file (overrides the recipe's)")
    run.add_argument("--num-processes", type=at_least(1), help="processes per stage without a config file (default: "
                     "all GPUs, or 1 on CPU; 2+ on CPU runs real data-parallel processes over gloo)")
    run.add_argument("--num-machines", type=at_least(1), default=1, help="machines taking part (each runs this same "
                     "command with its --machine-rank; the run folder must be on a filesystem they share)")
    run.add_argument("--machine-rank", type=at_least(0), default=0, help="this machine's rank: 0 prepares data, "
                     "evaluates and launches each stage; the others join every stage it launches")
    run.add_argument("--main-process-ip", help="address of machine 0, reachable from every machine")
    run.add_argument("--main-process-port", type=int, help="port on machine 0 for the stages' process group "
                     "(default: a free one, chosen by machine 0)")
    run.add_argument("--dry-run", action="store_true", help="validate the recipe and print each stage's arguments")
    run.set_defaults(func=cmd_run)


def add_ablate_parser(sub) -> None:
    ablate = sub.add_parser("ablate", help="run a recipe's ablation variants on shared earlier stages and compare them")
    ablate.add_argument("recipe", help="a recipe with an `ablation:` section, e.g. recipes/text/smollm2-135m-ablation.yaml")
    ablate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every variant")
    ablate.add_argument("--output-dir", default="outputs", type=user_path)
    ablate.add_argument("--accelerate-config")
    ablate.add_argument("--num-processes", type=at_least(1))
    ablate.add_argument("--seeds", type=at_least(1), help="runs per variant, seeds counting up from the stage's (default: "
                        "the section's `seeds:`, else 1); the comparison then shows mean ± 95 %% interval")
    ablate.add_argument("--variants", help="comma-separated subset of the variants to run (default: all)")
    ablate.add_argument("--until", metavar="STAGE", help="end each variant's run after this stage and compare there "
                        "(default: the section's `until:`, else the recipe's last stage)")
    ablate.set_defaults(func=cmd_ablate)


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="held-out evaluation of a run's stage or of any model")
    ev.add_argument("run", nargs="?", help="run folder, e.g. outputs/smollm2-135m: evaluated as the run did (its "
                    "recipe's eval: settings) except where a flag below says otherwise")
    ev.add_argument("--stage", help=f"stage of the run (default: {LAST_STAGE}; 'base' for the base model)")
    ev.add_argument("--model", help="model folder or Hub id (instead of a run)")
    ev.add_argument("--adapter", help="LoRA adapter folder to apply on --model")
    add_dataclass_arguments(ev, EvalArguments, unset=True)  # for a run, a flag not given is the run's own setting
    ev.add_argument("--out", type=user_path, help="write the metrics JSON to this file")
    ev.set_defaults(func=cmd_eval)


def add_report_parser(sub) -> None:
    report = sub.add_parser("report", help="(re)build a run's report.html and report.md, finished or not")
    report.add_argument("run", help="run folder, e.g. outputs/smollm2-135m")
    report.add_argument("--compare", nargs="+", metavar="RUN", help="other run folders to compare with (ablation)")
    report.set_defaults(func=cmd_report)


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="build datasets with data_prep jobs ('posttrain data list' lists them)",
                          add_help=False)
    data.add_argument("job", nargs="?", help="job name, 'validate', or 'list'")
    data.add_argument("rest", nargs=argparse.REMAINDER, help="the job's own arguments (--help for each job)")
    # own -h: the parser's automatic one would swallow `posttrain data JOB --help`, which belongs to the job
    data.add_argument("-h", "--help", action="store_true", help="show this help and the list of jobs")
    data.set_defaults(func=cmd_data, data_parser=data)


def add_doctor_parser(sub) -> None:
    doctor = sub.add_parser("doctor", help="check versions, devices, offline mode and the default model")
    doctor.set_defaults(func=cmd_doctor)


def add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a stage as a shareable folder (adapter or merged) with a model card")
    export.add_argument("run", help="run folder, e.g. outputs/smollm2-135m")
    export.add_argument("--stage", help=f"stage to export (default: {LAST_STAGE})")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    export.add_argument("--dtype", help="merged weights dtype: bf16, fp16 or fp32 (default: the base model's)")
    export.add_argument("--out", type=user_path, help="output folder (default: RUN/exports/<stage>[-merged])")
    export.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    export.add_argument("--force", action="store_true",
                        help="export a stage its promote gate rejected, or one left stale by its previous stage "
                             "being trained again")
    export.add_argument("--license", help="license for the card's metadata (default: the base model's, if known)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub model repo")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")
    export.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if missing)")
    export.set_defaults(func=cmd_export)


def add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal with a run's stage or an exported model (/reset, /exit)")
    chat.add_argument("run", nargs="?", help="run folder, e.g. outputs/smollm2-135m")
    chat.add_argument("--model", help="model folder or Hub id instead of a run (e.g. a merged export)")
    chat.add_argument("--adapter", help="LoRA adapter folder to apply on --model (e.g. an adapter export)")
    chat.add_argument("--stage", help=f"stage to chat with (default: {LAST_STAGE}; 'base' for the base model)")
    chat.add_argument("--thinking", choices=["on", "off"], help="thinking mode via the chat template's enable_thinking "
                      "(default: the stage's own, if it trained in one mode, else the template's default)")
    chat.add_argument("--system", metavar="TEXT", help="a system message opening the conversation (kept by /reset)")
    chat.add_argument("--max-new-tokens", type=at_least(1), default=256)
    chat.set_defaults(func=cmd_chat)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, taking `key=value` overrides anywhere on a `run` or `ablate` line: argparse fills a positional
    list only up to the first flag, so `posttrain run RECIPE --only upo stages.upo.upo_lambda=0` would leave the
    override unrecognised. (`parse_intermixed_args` would, but it does not support subcommands.)"""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    positional = "items" if args.command == "run" else "overrides" if args.command == "ablate" else None
    if positional and overrides:
        getattr(args, positional).extend(overrides)
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    args = parse_args(argv)
    terminate_on_sigterm()
    try:
        return args.func(args)
    except UserError as exc:
        # escaped: messages quote logs and paths, whose brackets ("[/pytorch/…/pair.cc:537]") are not markup
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return 2
    except KeyboardInterrupt as exc:
        then = ("resume from the last checkpoint" if args.command in ("run", "ablate") else
                "start over (nothing half-written was kept)")
        console.print(f"[yellow]interrupted[/yellow]: run the same command again to {then}")
        return 128 + exc.signum if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
