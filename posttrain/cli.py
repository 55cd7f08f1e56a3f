"""`posttrain`: run a recipe, evaluate, build data, check the environment.

    posttrain run [RECIPE] [section.key=value ...]   # default recipe: recipes/text/smollm2-135m.yaml
    posttrain eval outputs/<run> [--stage sft]
    posttrain data build_verifiable_tasks --out data/verifiable
    posttrain doctor

User mistakes (a missing file, a bad key, an unreachable model) print one paragraph and exit with code 2; a
traceback means a bug in posttrain.
"""

import argparse
import sys

from .console import console
from .errors import UserError


def cmd_run(args) -> int:
    from .pipeline import Pipeline
    from .recipe import load_recipe

    recipe_path = next((a for a in args.items if "=" not in a), None)
    overrides = [a for a in args.items if a != recipe_path]
    recipe = load_recipe(recipe_path, overrides)
    console.print(f"[bold]recipe[/bold] {recipe.path} · stages: {' → '.join(recipe.stages)}")
    if args.dry_run:
        import yaml

        pipeline = Pipeline(recipe, args.output_dir)
        for stage, stage_args in recipe.stages.items():
            console.rule(stage)
            console.print(yaml.safe_dump(pipeline.substitute(stage_args), sort_keys=False))
        return 0
    pipeline = Pipeline(recipe, args.output_dir, args.accelerate_config, args.num_processes)
    pipeline.run(only=args.only, start=args.start)
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import main as evaluate_main
    from .runs import eval_command

    argv = eval_command(args) if args.run else None
    if argv is None and not (args.model and args.dataset):
        raise UserError("give a run folder (posttrain eval outputs/<run>) or --model and --dataset")
    argv = argv or ["--model", args.model, "--dataset", args.dataset, "--split", args.split]
    if args.adapter:
        argv += ["--adapter", args.adapter]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    argv += ["--max-new-tokens", str(args.max_new_tokens), "--out", args.out or "/dev/stdout"]
    if args.out is None:
        console.print(f"[dim]evaluating: {' '.join(argv)}[/dim]")
    code = evaluate_main(argv)
    if args.out:
        metrics = json.loads(open(args.out).read())
        console.print(f"accuracy {metrics['accuracy']:.1%} · format {metrics['format']:.1%} · n={metrics['n']}")
    return code


def cmd_data(args) -> int:
    from .datajobs import list_jobs, load_job

    if args.job in (None, "list"):
        console.print("data jobs: " + ", ".join(list_jobs()) + ", validate")
        return 0
    return load_job(args.job, "posttrain data").main(args.rest) or 0


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    return run_doctor()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="SFT → DPO → UPO post-training with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (default: the SmolLM2-135M recipe)")
    run.add_argument("items", nargs="*", metavar="[RECIPE] [KEY=VALUE]",
                     help="recipe file, then overrides such as stages.sft.max_steps=10")
    run.add_argument("--output-dir", default="outputs", help="runs go to OUTPUT_DIR/<recipe name>/")
    run.add_argument("--only", metavar="STAGE", help="(re)run this stage only; earlier stages must be finished")
    run.add_argument("--from", dest="start", metavar="STAGE", help="(re)run from this stage on")
    run.add_argument("--accelerate-config", help="accelerate config file (overrides the recipe's)")
    run.add_argument("--num-processes", type=int, help="processes per stage without a config file (default: all GPUs, "
                     "or 1 on CPU; 2+ on CPU runs real data-parallel processes over gloo)")
    run.add_argument("--dry-run", action="store_true", help="validate the recipe and print each stage's arguments")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="held-out evaluation of a run's stage or of any model")
    ev.add_argument("run", nargs="?", help="run folder, e.g. outputs/smollm2-135m")
    ev.add_argument("--stage", help="stage of the run (default: the last finished one; 'base' for the base model)")
    ev.add_argument("--model", help="model folder or Hub id (instead of a run)")
    ev.add_argument("--adapter", help="LoRA adapter folder to apply on --model")
    ev.add_argument("--dataset", help="held-out data (prompt/answer/domain/thinking rows)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--out", help="write the metrics JSON to this file")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="build datasets with data_prep jobs ('posttrain data list' lists them)",
                          add_help=False)
    data.add_argument("job", nargs="?", help="job name, 'validate', or 'list'")
    data.add_argument("rest", nargs=argparse.REMAINDER, help="the job's own arguments (--help for each job)")
    data.set_defaults(func=cmd_data)

    doctor = sub.add_parser("doctor", help="check versions, devices, offline mode and the default model")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: run the same command again to resume from the last checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())
