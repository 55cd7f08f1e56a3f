"""Run a recipe: build its data, evaluate the base model, then each stage in its own `accelerate launch` process.

    outputs/<run>/
      run.json                 # status of every step, wall times, errors
      data/<name>/             # data_prep outputs (parquet + data card)
      base/                    # tokenizer with the recipe's chat template, base-model metrics.json
      sft/ dpo/ upo/           # adapter, resolved.yaml, metrics.json, lineage.json, <stage>.log
      .<stage>.partial/        # a stage in progress: Trainer checkpoints live here until it finishes

A stage writes into `.<stage>.partial/` and is renamed to `<stage>/` only when it has finished and its adapter has
been verified, so a folder named after a stage is always complete. Each stage records an `inputs_hash` over
everything that determines its adapter (its resolved arguments but the held-out evaluation's, the data fingerprints,
the base model, the previous stage's hash); a re-run skips a finished stage whose hash is unchanged (evaluating it
again when only the held-out evaluation changed) and resumes an unfinished one from its last checkpoint.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from . import lineage
from .checkpoints import finished_problem, remove_incomplete, resume_point
from .childproc import LAUNCHER, describe, spawn
from .configs import StageArguments
from .console import console
from .errors import Terminated, UserError, disk_full_error, is_disk_full
from .io import moved_aside, read_json, remove_leftovers, umask_permissions, write_json, write_text
from .nodes import Coordinator, explain_failure
from .promotion import GateStopped, blocks_chain, promotion
from .recipe import Recipe
from .recipe_files import FILE_SUFFIXES, STAGE_DATASET_KEYS, check_recipe_files
from .runlock import RunLock
from .runs import renamed, run_state
from .step_inputs import (
    NOT_INPUT_KEYS,
    NOT_TRAINING_KEYS,
    as_opened,
    by_content,
    changed_inputs,
    hub_commits,
    read_files,
    reward_sources,
)


def run_dir(recipe: Recipe, output_root: str | Path = "outputs") -> Path:
    return Path(output_root) / recipe.name


def interruption(exc: KeyboardInterrupt) -> str:
    return "interrupted (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"


class Pipeline:
    def __init__(self, recipe: Recipe, output_root: str | Path = "outputs", accelerate_config: str | None = None,
                 num_processes: int | None = None, project: str | None = None, nodes=None):
        self.recipe = recipe
        self.project = project or recipe.name  # live tracking: the experiment its stages are logged under
        self.root = run_dir(recipe, output_root).resolve()
        self.accelerate_config = accelerate_config or recipe.accelerate_config
        self.num_processes = num_processes
        self.nodes = nodes  # posttrain.nodes.Nodes: machine 0 of a multi-machine run announces each stage launch
        self.coordinator = Coordinator(self.root, nodes) if nodes and nodes.num_machines > 1 else None
        self.state_path = self.root / "run.json"
        self.state: dict = {}  # run.json, read under the run's lock (`run`)
        self.base_model: Path | None = None  # resolved at the start of run()
        self.legacy_base_hashes: tuple[str, ...] = ()  # base hashes earlier versions recorded (`evaluate_base`)
        self.later_data: set[str] = set()  # data jobs only stages after `--until` read: not built (`build_data`)
        self.inputs_now: dict = {}  # the last `stage_hashes`' inputs besides the arguments (`other_inputs`)

    # ------------------------------------------------------------------------------------------------ bookkeeping
    def _record(self, step: str, **info) -> None:
        self.state.setdefault("name", self.recipe.name)
        self.state["recipe"] = str(self.recipe.path)
        self.state["order"] = ["base", *self.recipe.stages]
        self.state.setdefault("steps", {}).setdefault(step, {}).update(info)
        write_json(self.state_path, self.state)

    def digest(self, obj) -> str:
        """Short hash of a step's inputs, with this run's folder written as {run}: a run folder copied or moved
        elsewhere (an ablation variant starts as a copy) keeps its finished steps."""
        text = renamed(json.dumps(obj, sort_keys=True, default=str), self.root, "{run}")
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def data_path(self, name: str) -> Path:
        return self.root / "data" / name

    def substitute(self, value):
        """`{data}` and `{run}` in string values point into this run's folder, `{base}` to the base model folder."""
        if isinstance(value, str):
            value = value.replace("{data}", str(self.root / "data")).replace("{run}", str(self.root))
            return value.replace("{base}", str(self.base_model) if self.base_model else "{base}")
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value

    def local_paths(self, value):
        """Relative paths in data-job arguments, found from the working directory, the recipe's folder or the
        repository (e.g. data_prep/sources/chitchat.jsonl), made absolute so the job finds them from anywhere. A bare
        file name (`chat.jsonl` beside the recipe) too, as `check_recipe_files` finds it; not other bare words."""
        from .recipe import resolve_relative

        if isinstance(value, str) and not Path(value).is_absolute() and ("/" in value
                                                                          or Path(value).suffix in FILE_SUFFIXES):
            found = resolve_relative(value, self.recipe.path)
            return str(found) if found.is_absolute() and found.exists() else value
        if isinstance(value, list):
            return [self.local_paths(v) for v in value]
        if isinstance(value, dict):
            return {k: self.local_paths(v) for k, v in value.items()}
        return value

    # ------------------------------------------------------------------------------------------------ steps
    def run(self, only: str | None = None, start: str | None = None, stop_before: str | None = None,
            until: str | None = None) -> dict:
        """Run the recipe (see the module docstring), after checking every file it names. One run per folder at a time
        (`RunLock`); run.json ends as done, failed or interrupted, never as running. `stop_before`: the stages before
        this one and the data jobs after the last of them (an ablation's shared part); `until`: up to and including
        this stage, without the data jobs that only later stages read."""
        try:
            check_recipe_files(self.recipe)
        except Exception:
            self._followers_hear_failed()
            raise
        # held by a live run: the followers in `.nodes` are that run's, so this one tells them nothing
        lock = RunLock(self.root).acquire(say=lambda text: console.print(f"[yellow]{text}[/yellow]"))
        ending = "failed"  # what the other machines of a multi-machine run hear, however this one's run ends
        try:
            for path in remove_leftovers(self.root):
                console.print(f"[yellow]removed {path}, left half-written by a process that was killed[/yellow]")
            self.state = self.read_state()
            state = self._run(only, start, stop_before, until)
            ending = "done"
            return state
        except KeyboardInterrupt as exc:
            ending = "interrupted"
            self._end_run("interrupted", interruption(exc))
            raise
        except GateStopped:  # the run is already marked "stopped" by the gate
            ending = "stopped"
            raise
        except Exception as exc:
            full = is_disk_full(exc)
            disk_full = full and not isinstance(exc, UserError)  # a UserError already says what ran out
            error = disk_full_error(exc, f"the run's files in {self.root}") if disk_full else exc
            if full:  # a stage stopped mid-save: its unmarked checkpoint frees the space run.json needs
                for partial in self.root.glob(".*.partial"):
                    remove_incomplete(partial)
            self._end_run("failed", str(error))
            if error is exc:
                raise
            raise error from exc
        finally:
            if self.coordinator:  # followers exit with the run, once run.json says how it ended
                with contextlib.suppress(OSError):  # a full disk: the run's own error matters more
                    self.coordinator.finish(ending)
            lock.release()

    def _followers_hear_failed(self) -> None:
        """For a run that failed before taking its folder's lock: the other machines hear it too, under the lock (a
        live run holding it has its own followers in `.nodes`)."""
        if not self.coordinator:
            return
        try:
            lock = RunLock(self.root).acquire(say=lambda text: None)
        except UserError:
            return
        try:
            self.coordinator.finish("failed")
        finally:
            lock.release()

    def read_state(self) -> dict:
        """run.json, or nothing when it cannot be read (a power loss while it was written, with a filesystem that had
        not synced it): what finished is in the stages' own folders, so the run goes on, with a warning."""
        return run_state(self.root, say=lambda why: console.print(
            f"[yellow]{why}; starting its record of the run over (finished stages are still skipped)[/yellow]"))

    def _end_run(self, status: str, error: str) -> None:
        """Mark the run, and the step that was running, as failed or interrupted (best effort: on a full disk even
        this write may fail, and the original error matters more). A run already done (interrupted while its report
        was written) stays done."""
        if self.state.get("steps", {}).get("run", {}).get("status") == "done":
            return
        try:
            for step, info in self.state.get("steps", {}).items():
                if step != "run" and info.get("status") == "running":
                    self._record(step, status=status, error=error)
            self._record("run", status=status, error=error, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        except OSError:
            pass

    def _run(self, only: str | None, start: str | None, stop_before: str | None, until: str | None) -> dict:
        order = list(self.recipe.stages)
        if until and until not in order:
            raise UserError(f"--until: stage '{until}' is not in recipe {self.recipe.path} (stages: {', '.join(order)})")
        if stop_before:  # an ablation's shared part: everything before the varied stage
            order = order[:order.index(stop_before)]
        if until:
            order = order[:order.index(until) + 1]
        for name in (only, start):
            if name and name not in order:
                raise UserError(f"stage '{name}' is not in recipe {self.recipe.path} (stages: {', '.join(order)})")
        self.root.mkdir(parents=True, exist_ok=True)
        # the recipe as run (command-line overrides applied): what the report and model cards show
        write_text(self.root / "recipe.yaml", yaml.safe_dump(self.recipe.raw, sort_keys=False))
        # an earlier run's end is not this one's: the report of a run still going (or stopped) shows none
        self._record("run", started=time.strftime("%Y-%m-%d %H:%M:%S"), status="running", error=None, finished=None,
                     stopped_by=None)
        try:
            self.resolve_base()
            # `--until`: the data jobs only the stages after it read are left for the run that gets there
            self.later_data = self.data_for_later_stages(order) if until else set()
            self.build_data(after=None)
            self.evaluate_base()
            selected = {only} if only else set(order[order.index(start):]) if start else set(order)
            previous = None
            for stage in order[:max((order.index(s) for s in selected), default=-1) + 1]:
                if stage in selected:
                    self.run_stage(stage, previous, force=bool(only or start))
                    self.promote(stage)
                elif not (self.root / stage / "lineage.json").is_file():
                    raise UserError(f"stage '{stage}' comes before the ones asked for and has not finished; "
                                    "run it first")
                elif changed := self.changed_since(stage, previous):
                    # the selected stages would train from an adapter the recipe no longer gives, reported as current
                    raise UserError(f"stage '{stage}' comes before the ones asked for and its inputs changed since it "
                                    f"finished ({changed}); run it first (--from {stage})")
                elif self.reevaluate(stage):  # kept, but scored on the evaluation the stages after it get
                    self.promote(stage)
                if stage != until:
                    self.build_data(after=stage)
                previous = stage
            self._record("run", status="done", finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            self.print_summary()
        except KeyboardInterrupt as exc:  # marked before the report reads how the run ended
            self._end_run("interrupted", interruption(exc))
            raise
        except GateStopped:  # marked "stopped" by the gate
            raise
        except Exception as exc:  # as an interruption is (`run` rewords a full disk afterwards)
            self._end_run("failed", str(exc))
            raise
        finally:  # a report also for a failed or interrupted run: it shows what finished and what broke
            from .report import try_build_report

            try_build_report(self.root)
        return self.state

    def build_data(self, after: str | None) -> None:
        """Run the recipe's data jobs that belong at this point: before everything, or right after stage `after`
        (then the stage's inputs hash and its weights are part of the job's inputs, so a re-trained stage rebuilds
        its data); not those only stages after `--until` read (`later_data`)."""
        from .datajobs import run_job

        for name, spec in self.recipe.data.items():
            if spec.get("after") != after or name in self.later_data:
                continue
            args = self.local_paths(self.substitute({k: v for k, v in spec.items() if k not in ("job", "after")}))
            if spec["job"] == "build_onpolicy_pairs" and self.recipe.base.trust_remote_code:
                args.setdefault("trust_remote_code", True)  # it loads the recipe's base model
            upstream = None
            if after:  # a job that samples from the stage's weights: rebuilt when they change
                upstream = {"inputs": json.loads((self.root / after / "lineage.json").read_text())["inputs_hash"],
                            "weights": lineage.weights_fingerprint(self.root / after)}
            inputs = {"job": spec["job"], "args": args, "after": upstream, "reads": read_files(args)}
            # each only when there is some, so other jobs keep their digests
            if own_rewards := reward_sources(args.get("rewards")):  # the on-policy pair sampler's, as UPO's
                inputs["rewards"] = own_rewards
            if commits := hub_commits(args):
                inputs["hub"] = commits
            digest = self.digest(inputs)
            out, stamp = self.data_path(name), self.data_path(name).with_suffix(".inputs")
            if out.is_dir() and stamp.is_file() and stamp.read_text() == digest:
                console.print(f"[dim]data {name}: up to date[/dim]")
                continue
            console.rule(f"data: {name} ({spec['job']})")
            started = time.time()
            with moved_aside(out):  # the stale output: some jobs refuse to replace a folder unless told to
                run_job(spec["job"], args, out)
            write_text(stamp, digest)
            self._record(f"data/{name}", status="done", wall_time_s=round(time.time() - started, 1))

    def data_for_later_stages(self, order: list[str]) -> set[str]:
        """The data jobs whose output (`{data}/<name>`) no stage in `order`, the held-out evaluation or another data
        job names: only the stages after `order` read them."""
        readers = json.dumps([[self.recipe.stages[s] for s in order], dataclasses.asdict(self.recipe.eval),
                              list(self.recipe.data.values())], default=str)
        return {name for name in self.recipe.data if f"{{data}}/{name}" not in readers}

    def resolve_base(self) -> None:
        """The base model as a local folder, and its tokenizer with the recipe's chat template in base/tokenizer."""
        from .models import load_tokenizer, resolve_model

        base = self.recipe.base
        console.rule("base model")
        with console.status(f"resolving {base.model_name_or_path}…"):
            self.base_model = resolve_model(base.model_name_or_path, base.model_revision, base.gguf_file,
                                            base.gguf_package)
        tokenizer = load_tokenizer(self.base_model, base.chat_template, base.trust_remote_code)
        tokenizer.save_pretrained(self.root / "base" / "tokenizer")
        self.template = tokenizer.chat_template

    def evaluate_base(self) -> None:
        """Held-out metrics of the base model (skipped when its inputs did not change)."""
        out = self.root / "base"
        # what the stages train from; the held-out evaluation is not part of it (`reevaluate`)
        shape = {"model": lineage.model_fingerprint(self.base_model), "template": self.template}
        identity = lineage.base_identity(self.recipe.base.model_name_or_path, self.base_model)
        self.base_hash = self.digest({**shape, **identity})
        # what runs recorded before `base_identity` existed, and before it held a local base's tokenizer files, hashed:
        # their finished steps stay finished after an upgrade
        weights_only = {k: v for k, v in identity.items() if k != "tokenizer"}
        self.legacy_base_hashes = (self.digest(shape), self.digest({**shape, **weights_only}))
        self.eval_hash = self.held_out_hash()
        digest = self.digest({"base": self.base_hash, "eval": self.eval_hash})
        if self._up_to_date(out, digest, *(self.digest({"base": legacy, "eval": self.eval_hash})
                                           for legacy in self.legacy_base_hashes)):
            # what an earlier failed attempt (another eval set) recorded no longer describes the base evaluation
            self._record("base", status="done", error=None, log=None)
            return
        started = time.time()
        evaluation = self.run_eval(out, "base") if self.recipe.eval.dataset else None
        write_json(out / "metrics.json", {"stage": "base", "status": "done", "eval": evaluation,
                                          "wall_time_s": round(time.time() - started, 1)})
        # `base_hash`: what the stages trained from; a stage that records another one is stale (`stale_stages`).
        # `eval_hash`: the evaluation every step is now scored with; a stage whose metrics record another one (a run
        # stopped while it evaluated the finished stages again) is not compared with the base (`accuracy_line`)
        write_json(out / "lineage.json", {"stage": "base", "inputs_hash": digest, "base_hash": self.base_hash,
                                          "eval_hash": self.eval_hash,
                                          "base_model": str(self.base_model), **lineage.environment()})
        self._record("base", status="done", wall_time_s=round(time.time() - started, 1), error=None, log=None)

    def run_eval(self, out: Path, step: str, adapter: Path | None = None) -> dict:
        """Held-out metrics of the base model (+ a finished stage's `adapter`), computed in a child process like
        every stage."""
        settings = self.eval_settings()
        settings_path, result = write_json(out / "eval_settings.json", dataclasses.asdict(settings)), out / "eval.json"
        cmd = self.eval_command(["-m", "posttrain.evaluate", "--settings", str(settings_path), "--model",
                                 str(self.base_model), "--tokenizer", str(self.root / "base" / "tokenizer"), "--out",
                                 str(result)])
        if adapter is not None:
            cmd += ["--adapter", str(adapter)]
        if self.recipe.base.trust_remote_code:
            cmd.append("--trust-remote-code")
        what = f"the {step} adapter" if adapter is not None else "the base model"
        console.print(f"evaluating {what} on {settings.dataset} ({settings.split})…")
        self._spawn(cmd, out / f"{step}.eval.log" if adapter is not None else out / "base.log", step)
        evaluation = json.loads(result.read_text())
        result.unlink()
        settings_path.unlink()
        return evaluation

    def eval_command(self, script: list[str]) -> list[str]:
        """An evaluation's command: with several processes on this machine (its GPUs, `--num-processes`), as many
        processes under accelerate's launcher, each generating a share of the prompts (`generation.Share`), as a
        stage's held-out evaluation does; else one process. Only this machine's: the other machines of a
        multi-machine run wait for the next stage."""
        from .devices import accelerate_launch_args

        flags = accelerate_launch_args(None, self.num_processes)
        return [sys.executable, "-m", LAUNCHER, *flags, *script] if "--multi_gpu" in flags else [sys.executable, *script]

    def eval_settings(self):
        """The recipe's held-out evaluation, its dataset's path resolved: the same for the base model and every
        stage."""
        return dataclasses.replace(self.recipe.eval, dataset=self.substitute(self.recipe.eval.dataset))

    def held_out_hash(self) -> str:
        """What held-out metrics depend on besides the model: the evaluation's settings and data (`eval_hash`, set
        with the base model's evaluation; a finished stage evaluated with another one is evaluated again)."""
        settings = self.eval_settings()
        if not settings.dataset:
            return self.digest({"eval": None})
        return self.digest({"eval": dataclasses.asdict(settings),
                            "dataset": lineage.dataset_fingerprint(settings.dataset)})

    def stage_args(self, stage: str, previous: str | None) -> dict:
        from .devices import device_defaults, speed_defaults

        base = self.recipe.base
        recipe_args = self.recipe.stages[stage]
        args = {**device_defaults(recipe_args), **speed_defaults(stage, self.base_model, recipe_args),
                **self.substitute(recipe_args)}
        args.update(model_name_or_path=str(self.base_model), tokenizer_name_or_path=str(self.root / "base" / "tokenizer"),
                    trust_remote_code=base.trust_remote_code, output_dir=str(self.root / f".{stage}.partial"))
        # live tracking (report_to: trackio / tensorboard / wandb): the run is the project, each stage one run in it
        # (named in `run_stage`, after the stage's inputs are known)
        args.setdefault("project", self.project)
        if previous:
            args["adapter_path"] = str(self.root / previous)
        if self.recipe.eval.dataset:
            args.update(StageArguments.from_eval(self.eval_settings()))
        return args

    def stage_hashes(self, stage: str, args: dict, previous: str | None) -> tuple[str, ...]:
        """What the stage's adapter depends on: its arguments but the held-out evaluation's (`held_out_hash`) and the
        ones that only say when to log and save (`NOT_TRAINING_KEYS`), the data it trains on, the base model and the
        previous stage's hash. Returns that hash, and the one runs recorded before the logging and saving keys were
        left out, and the ones with dataset paths as written (before `as_opened`), so their finished stages and
        checkpoints still count as the same inputs (the datasets are fingerprinted once for all: a data file without a
        card is hashed whole)."""
        datasets = {k: lineage.dataset_fingerprint(v) for k, v in args.items()
                    if k in STAGE_DATASET_KEYS and v}
        for index, phase in enumerate(args.get("phases") or []):  # a UPO curriculum phase's own prompt set
            if isinstance(phase, dict) and phase.get("dataset_name"):
                datasets[f"phases.{index}"] = lineage.dataset_fingerprint(phase["dataset_name"])
        datasets.update({f"rewards.{name}": source for name, source in reward_sources(args.get("rewards")).items()})
        prev_hash = json.loads((self.root / previous / "lineage.json").read_text())["inputs_hash"] if previous else None

        def digest(spelled, left_out, base) -> str:
            stable = {k: v for k, v in spelled.items() if k not in left_out}
            return self.digest({"args": stable, "datasets": datasets, "base": base, "previous": prev_hash})

        self.inputs_now = {"datasets": datasets, "base_hash": self.base_hash, "previous_inputs_hash": prev_hash}
        return tuple(dict.fromkeys(
            digest(spelled, left_out, base) for spelled in (as_opened(args, by_content), as_opened(args), args)
            for base in (self.base_hash, *self.legacy_base_hashes)
            for left_out in ((*NOT_INPUT_KEYS, *NOT_TRAINING_KEYS), NOT_INPUT_KEYS)))

    def changed_since(self, stage: str, previous: str | None) -> str | None:
        """What changed in a finished stage's inputs since it was trained (`changed_inputs`), or None."""
        args = self.stage_args(stage, previous)
        if self._up_to_date(self.root / stage, *self.stage_hashes(stage, args, previous)):
            return None
        return self.what_changed(self.root / stage, args)

    def what_changed(self, folder: Path, args: dict) -> str:
        """`changed_inputs` of the stage trained in `folder` against `args`, after `stage_hashes` for them."""
        return changed_inputs(folder / "resolved.yaml", args, read_json(folder / "lineage.json"), self.inputs_now)

    def reevaluate(self, stage: str) -> bool:
        """A finished stage whose held-out evaluation changed (another eval set, more tokens, a smaller batch after
        running out of memory) is evaluated again, not trained again. So is one whose stage process could not
        evaluate it (`eval_deferred`: weights sharded over its processes), in a process of its own. The new metrics
        are written before the lineage records them, so an interrupted evaluation is redone on the next run. Returns
        whether it evaluated."""
        final = self.root / stage
        record, metrics = read_json(final / "lineage.json"), read_json(final / "metrics.json")
        deferred = metrics.get("eval_deferred") if self.recipe.eval.dataset else None
        if record.get("eval_hash") == self.eval_hash and not deferred:
            return False
        console.print(f"{stage}: {deferred}; the saved adapter is evaluated in one process" if deferred else
                      f"{stage}: the held-out evaluation changed; the finished adapter is evaluated again")
        metrics["eval"] = self.run_eval(final, stage, adapter=final) if self.recipe.eval.dataset else None
        metrics.pop("eval_deferred", None)
        metrics.pop("promotion", None)
        write_json(final / "metrics.json", metrics)
        resolved = final / "resolved.yaml"  # what `posttrain eval RUN --stage S` reads to evaluate as the run did
        if resolved.is_file() and self.recipe.eval.dataset:
            args = {**yaml.safe_load(resolved.read_text()), **StageArguments.from_eval(self.eval_settings())}
            write_text(resolved, yaml.safe_dump(args, sort_keys=False))
        write_json(final / "lineage.json", {**record, "eval_hash": self.eval_hash})
        return True

    def _up_to_date(self, folder: Path, *digests: str) -> bool:
        path = folder / "lineage.json"
        return path.is_file() and json.loads(path.read_text()).get("inputs_hash") in digests

    def run_stage(self, stage: str, previous: str | None, force: bool = False) -> None:
        args = self.stage_args(stage, previous)
        same = self.stage_hashes(stage, args, previous)
        digest = same[0]
        final, partial = self.root / stage, self.root / f".{stage}.partial"
        finished = self._up_to_date(final, *same)
        damage = finished_problem(final) if finished else None
        if finished and not damage:
            damage = lineage.other_previous(self.root, read_json(final / "lineage.json"))
        if damage:
            console.print(f"[yellow]{stage}: finished earlier with the same inputs, but {damage}: trained again"
                          "[/yellow]")
        elif not finished and (final / "lineage.json").is_file():
            console.print(f"{stage}: finished earlier with other inputs ({self.what_changed(final, args)}); trained "
                          "again")
        elif not force and finished:
            console.print(f"[green]✓ {stage}[/green]: finished earlier with the same inputs, skipped")
            # what an earlier failed attempt (with other inputs) recorded no longer describes the stage
            self._record(stage, skipped=True, status="done", error=None, log=None)
            self.reevaluate(stage)
            return
        console.rule(f"stage: {stage}")
        partial_lineage = partial / "lineage.json"
        if partial.is_dir() and not (partial_lineage.is_file() and self._up_to_date(partial, *same)
                                     and not lineage.other_previous(self.root, read_json(partial_lineage))):
            # a partial run of other inputs cannot be resumed
            saved = sorted(p.name for p in partial.glob("checkpoint-*"))
            if saved:
                console.print(f"[yellow]{stage}: the unfinished run in {partial} was for other inputs "
                              f"({self.what_changed(partial, args)}); its checkpoints "
                              f"({', '.join(saved)}) are discarded and the stage starts over[/yellow]")
            shutil.rmtree(partial, ignore_errors=True)
        elif not force and partial.is_dir() and self._finished_in(partial):
            # the stage process finished (adapter verified, metrics written) and the run was stopped before the
            # folder was moved into place, its checkpoints possibly removed already: move it, do not train again
            console.print(f"{stage}: finished in {partial} before the run was stopped; moved into place")
            self._record(stage, status="running", skipped=False)
            self._move_into_place(partial, final)
            self.reevaluate(stage)
            self._record(stage, status="done", error=None, log=None)
            return
        partial.mkdir(parents=True, exist_ok=True)
        args.setdefault("run_name", f"{self.recipe.name}-{self.tracking_run(stage, digest)}")
        checkpoint = resume_point(partial, say=lambda text: console.print(f"[yellow]{text}[/yellow]"))
        if checkpoint:
            console.print(f"resuming {stage} from {checkpoint.name}")
            args["resume_from_checkpoint"] = str(checkpoint)
        (partial / "resolved.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
        write_json(partial_lineage, {**lineage.stage_lineage(stage, args, digest, self, previous),
                                     "eval_hash": self.eval_hash})
        started = time.time()
        self._record(stage, status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"), skipped=False)
        cmd, env = self.stage_command(["-m", f"posttrain.stages.{stage}", "--config", str(partial / "resolved.yaml")])
        if self.coordinator:
            self.coordinator.announce(stage, cmd[3:])  # what follows `python -m accelerate.commands.launch`
        self._spawn(cmd, partial / f"{stage}.log", stage, {**env, **self.tracking_env(stage, digest)})
        self._move_into_place(partial, final)
        self.reevaluate(stage)
        # a failed attempt's log path (in the `.partial` folder, gone now) no longer applies either
        self._record(stage, status="done", wall_time_s=round(time.time() - started, 1), error=None, log=None)

    @staticmethod
    def _finished_in(partial: Path) -> bool:
        """Whether a stage's process finished in `partial`: its metrics.json (written last) says done and its adapter
        loads."""
        try:
            done = read_json(partial / "metrics.json").get("status") == "done"
        except ValueError:  # cut short while it was written
            return False
        return done and finished_problem(partial) is None

    @staticmethod
    def _move_into_place(partial: Path, final: Path) -> None:
        """`partial` becomes `final`: the old `final` moved aside first, so a kill leaves one of the two whole (a
        finished `partial` is moved on the next run, `_finished_in`); the checkpoints go last."""
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        umask_permissions(partial)  # the adapter (safetensors: 0600) readable by whoever may read the run
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        for checkpoint_dir in final.glob("checkpoint-*"):
            shutil.rmtree(checkpoint_dir)

    def promote(self, stage: str) -> None:
        """Compare a finished stage with the last evaluated step before it (`promotion`), record the comparison and
        its gate's verdict in its metrics.json and run.json, and stop the chain when the gate says so."""

        steps = ["base", *self.recipe.stages]
        metrics_path = self.root / stage / "metrics.json"
        metrics = read_json(metrics_path)
        if not metrics.get("eval"):
            return
        previous = next(((s, m["eval"]) for s in reversed(steps[:steps.index(stage)])
                         if (m := read_json(self.root / s / "metrics.json")).get("eval")), None)
        if previous is None:
            return
        record = promotion(self.recipe.gates.get(stage), previous[0], previous[1], metrics["eval"])
        metrics["promotion"] = record
        write_json(metrics_path, metrics)
        self._record(stage, gate=record["gate"])
        if record["gate"]:
            mark = "[green]passed[/green]" if record["gate"]["passed"] else "[red]failed[/red]"
            console.print(f"promote gate of {stage}: {mark}: {record['gate']['reason']}")
        if blocks_chain(record):
            self._record("run", status="stopped", stopped_by=stage, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            self.print_summary()
            raise GateStopped(f"stage '{stage}' is worse than {previous[0]} and its promote gate stopped the run: "
                            f"{record['gate']['reason']}. The stage stays in {self.root / stage} for inspection but "
                            f"`posttrain export` refuses it (--force to override). Change the stage's settings and "
                            "run again, or relax `gate:` in the recipe.")

    def stage_command(self, script: list[str]) -> tuple[list[str], dict]:
        """The command and environment that run a stage's `script` (`-m module --config ...`): its one process as
        `accelerate launch` would start it, without the launcher in between (`devices.direct_command`), else
        accelerate's launcher (several processes or machines, FSDP, DeepSpeed)."""
        from .devices import accelerate_launch_args, direct_command

        flags = accelerate_launch_args(self.accelerate_config, self.num_processes, self.nodes)
        direct = None if self.coordinator else direct_command(flags, script)
        return direct or ([sys.executable, "-m", LAUNCHER, *flags, *script], {})

    @staticmethod
    def tracking_run(stage: str, digest: str) -> str:
        """A stage's live-tracking run, one per inputs: a resume continues its curves, while a stage trained again
        with other inputs (or the same recipe run in another folder with other settings) gets a run of its own instead
        of drawing over the old curves (trackio resumes a run of the same name; TensorBoard merges one folder's event
        files)."""
        return f"{stage}-{digest[:8]}"

    def tracking_env(self, stage: str, digest: str) -> dict:
        """TensorBoard event files of a stage go to `<run>/tensorboard/<stage>-<inputs hash>` (not into the stage
        folder, which is renamed when it finishes), so `tensorboard --logdir outputs` shows every run and stage by name
        while they train, and a stage trained again with other inputs as a run of its own. Trackio writes to its own
        local folder (`TRACKIO_DIR`, default ~/.cache/huggingface/trackio)."""
        if "TENSORBOARD_LOGGING_DIR" in os.environ:
            return {}
        return {"TENSORBOARD_LOGGING_DIR": str(self.root / "tensorboard" / self.tracking_run(stage, digest))}

    def _spawn(self, cmd: list[str], log_path: Path, step: str, env: dict | None = None) -> None:
        """Run a child process, streaming its output (tracebacks to the log only) to the terminal and to `log_path`;
        a failure becomes a UserError with the child's own cause and the log's path."""
        started = time.time()
        # the log keeps every attempt's output: only this one's explains its failure
        offset = log_path.stat().st_size if log_path.is_file() else 0
        outcome = spawn(cmd, log_path, env)
        if outcome.code != 0 and outcome.saved_on_sigterm:  # SIGTERM to one of its processes, not to this one
            console.print(f"[yellow]step '{step}' stopped on SIGTERM to one of its processes (on this machine or "
                          "another) and saved the step it was at[/yellow]")
            raise Terminated(signal.SIGTERM)
        if outcome.code != 0:
            with open(log_path, "rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
            # a lost process (a dead rank, a machine gone) explains more than the survivor's own exception
            cause = outcome.message or explain_failure(lines) or describe(outcome)
            self._record(step, status="failed", error=cause, log=str(log_path),
                         wall_time_s=round(time.time() - started, 1))
            self._record("run", status="failed", error=f"step '{step}' failed")
            raise UserError(f"step '{step}' failed: {cause}\nLog: {log_path}\nFix the cause and run the same command "
                            "again: finished stages are skipped and this one resumes from its last complete "
                            "checkpoint.")

    def print_summary(self) -> None:
        from .report import accuracy_line

        line = accuracy_line(self.root)
        if line:
            console.print(f"[bold]held-out accuracy:[/bold] {line}")
        console.print(f"outputs in {self.root}")
