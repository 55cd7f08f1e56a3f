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
import signal
import time
from pathlib import Path

import yaml

from . import lineage
from .checkpoints import remove_incomplete
from .childproc import describe, spawn
from .console import console
from .errors import Terminated, UserError, disk_full_error, is_disk_full
from .io import moved_aside, read_json, remove_leftovers, write_json, write_text
from .nodes import Coordinator, explain_failure
from .pipeline_eval import HeldOutSteps
from .pipeline_stages import StageSteps
from .promotion import GateStopped
from .recipe import Recipe
from .recipe_files import FILE_SUFFIXES, check_recipe_files
from .runlock import RunLock
from .runs import renamed, run_state
from .step_inputs import (
    hub_commits,
    read_files,
    reward_sources,
)

SAMPLING_JOBS = ("build_onpolicy_pairs",)  # the data jobs that divide their prompts among the processes launched


def run_dir(recipe: Recipe, output_root: str | Path = "outputs") -> Path:
    return Path(output_root) / recipe.name


def interruption(exc: KeyboardInterrupt) -> str:
    return "interrupted (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"


class Pipeline(HeldOutSteps, StageSteps):
    """One run of a recipe in `<output_root>/<recipe name>/`: its record (run.json), data jobs, base model and the
    order of the steps; the held-out evaluations (`pipeline_eval.HeldOutSteps`) and the training stages
    (`pipeline_stages.StageSteps`) are its steps."""

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
        self.base_identity: dict | None = None  # `lineage.base_identity` of `base_model` (`resolve_base`)
        self.base_spelling: str | None = None  # `base_model` in the steps' hashes (`spell_base`, `digest`)
        self.base_recorded: str | None = None  # and as runs recorded it before (`spell_base`)
        self.legacy_base_hashes: tuple[str, ...] = ()  # base hashes earlier versions recorded (`evaluate_base`)
        self.later_data: set[str] = set()  # data jobs only stages after `--until`/`--only` read: not built
        self.inputs_now: dict = {}  # the last `stage_hashes`' inputs besides the arguments (`other_inputs`)

    # ------------------------------------------------------------------------------------------------ bookkeeping
    def _record(self, step: str, **info) -> None:
        self.state.setdefault("name", self.recipe.name)
        self.state["recipe"] = str(self.recipe.path)
        self.state["order"] = ["base", *self.recipe.stages]
        self.state.setdefault("steps", {}).setdefault(step, {}).update(info)
        write_json(self.state_path, self.state)

    def digest(self, obj, legacy: bool = False) -> str:
        """Short hash of a step's inputs, with this run's folder written as {run} and the base model's folder by what
        it holds (`lineage.base_spelling`): a run folder copied or moved elsewhere (an ablation variant starts as a
        copy), or to a machine whose model cache lies elsewhere, keeps its finished steps. `legacy`: with the base
        model's folder as runs recorded it before, its path."""
        # a folder as json.dumps spells it: a non-ASCII letter in its path (/home/zoë) is escaped there (\u00eb)
        text = renamed(json.dumps(obj, sort_keys=True, default=str), json.dumps(str(self.root))[1:-1], "{run}")
        if self.base_spelling:
            recorded = json.dumps(self.base_recorded or str(self.base_model))[1:-1]
            text = renamed(text, json.dumps(str(self.base_model))[1:-1], recorded if legacy else self.base_spelling)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def spell_base(self) -> None:
        """`base_identity`, `base_spelling` and `base_recorded` of the resolved `base_model`: a local folder the recipe
        names relative to the working directory was recorded so, before recipes named it absolute."""
        name = self.recipe.base.model_name_or_path
        self.base_identity = lineage.base_identity(name, self.base_model)
        self.base_spelling = lineage.base_spelling(self.base_model, self.base_identity)
        written = Path(str((self.recipe.raw.get("base") or {}).get("model_name_or_path", name))).expanduser()
        relative = not written.is_absolute() and written.is_dir() and written.resolve() == self.base_model.resolve()
        self.base_recorded = str(written) if relative else str(self.base_model)

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
        this stage, without the data jobs that only later stages read; `only`: this stage alone, likewise."""
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
        selected = {only} if only else set(order[order.index(start):]) if start else set(order)
        # before the data jobs and the base evaluation, which can take minutes (pairs sampled from the stage before)
        for stage in order[:min((order.index(s) for s in selected), default=len(order))]:
            if not (self.root / stage / "lineage.json").is_file():
                raise UserError(f"stage '{stage}' comes before the ones asked for and has not finished; "
                                "run it first")
        self.root.mkdir(parents=True, exist_ok=True)
        # the recipe as run (command-line overrides applied): what the report and model cards show
        write_text(self.root / "recipe.yaml", yaml.safe_dump(self.recipe.raw, sort_keys=False))
        # an earlier run's end is not this one's: the report of a run still going (or stopped) shows none
        self._record("run", started=time.strftime("%Y-%m-%d %H:%M:%S"), status="running", error=None, finished=None,
                     stopped_by=None)
        try:
            self.resolve_base()
            # `--until` or `--only`: the run ends at that stage, and the data jobs only the stages after it read
            # (on-policy pairs sampled for DPO after SFT: minutes at real sizes) are left for a run that gets there
            final = until or only
            self.later_data = self.data_for_later_stages(order[:order.index(final) + 1]) if final else set()
            self.build_data(after=None)
            self.evaluate_base()
            previous = None
            for stage in order[:max((order.index(s) for s in selected), default=-1) + 1]:
                if stage in selected:
                    self.run_stage(stage, previous, force=bool(only or start))
                    self.promote(stage)
                elif changed := self.changed_since(stage, previous):
                    # the selected stages would train from an adapter the recipe no longer gives, reported as current
                    raise UserError(f"stage '{stage}' comes before the ones asked for and its inputs changed since it "
                                    f"finished ({changed}); run it first (--from {stage})")
                elif self.reevaluate(stage):  # kept, but scored on the evaluation the stages after it get
                    self.promote(stage)
                if stage != final:
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
        its data); not those only stages after `--until`/`--only` read (`later_data`)."""
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
            if out.is_dir() and stamp.is_file() and stamp.read_text() in (digest, self.digest(inputs, legacy=True)):
                console.print(f"[dim]data {name}: up to date[/dim]")
                continue
            console.rule(f"data: {name} ({spec['job']})")
            started = time.time()
            # a job sampling from a model: as many processes as a stage (`sampling_command`)
            sampling = spec["job"] in SAMPLING_JOBS
            launch = (lambda script, name=name: self.sampling_command(name, script)) if sampling else None
            # its options where every machine reads them
            shared = self.coordinator.folder if sampling and self.coordinator else None
            if shared:
                shared.mkdir(parents=True, exist_ok=True)
            with moved_aside(out):  # the stale output: some jobs refuse to replace a folder unless told to
                run_job(spec["job"], args, out, launch, shared)
            write_text(stamp, digest)
            self._record(f"data/{name}", status="done", wall_time_s=round(time.time() - started, 1))

    def data_for_later_stages(self, order: list[str]) -> set[str]:
        """The data jobs whose output (`{data}/<name>`) no stage in `order`, the held-out evaluation or another data
        job names: only the stages after `order` read them."""
        readers = json.dumps([[self.recipe.stages[s] for s in order], dataclasses.asdict(self.recipe.eval),
                              list(self.recipe.data.values())], default=str)
        return {name for name in self.recipe.data if f"{{data}}/{name}" not in readers}

    def resolve_base(self) -> None:
        """The base model as a local folder, and its tokenizer with the recipe's chat template in base/tokenizer,
        saved again unless what it was saved from and what was saved are unchanged (`tokenizer.source.json` beside
        it): loading it imports transformers and torch, most of a rerun with nothing left to do."""
        from .models import load_tokenizer, resolve_model
        from .models.load import tokenizer_source

        base = self.recipe.base
        console.rule("base model")
        with console.status(f"resolving {base.model_name_or_path}…"):
            self.base_model = resolve_model(base.model_name_or_path, base.model_revision, base.gguf_file,
                                            base.gguf_package)
            self.spell_base()
        folder, stamp = self.root / "base" / "tokenizer", self.root / "base" / "tokenizer.source.json"
        source = tokenizer_source(self.base_model, base.chat_template, base.trust_remote_code)
        saved = read_json(stamp)
        if saved.get("source") == source and folder.is_dir() and saved.get("saved") == lineage.tokenizer_digest(folder):
            self.template = saved["template"]
            return
        stamp.unlink(missing_ok=True)  # saved in place below: a run killed meanwhile must not trust the folder
        tokenizer = load_tokenizer(self.base_model, base.chat_template, base.trust_remote_code)
        tokenizer.save_pretrained(folder)
        self.template = tokenizer.chat_template
        write_json(stamp, {"source": source, "saved": lineage.tokenizer_digest(folder), "template": self.template})

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
