"""A run's training stages (`Pipeline`): each stage's arguments and the hash of its inputs, skipped when finished with
the same ones, else trained in its own process in `.<stage>.partial/` and moved into place."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from . import lineage
from .checkpoints import finished_problem, resume_point
from .childproc import LAUNCHER
from .configs import StageArguments
from .console import console
from .io import read_json, umask_permissions, write_json
from .nodes import outside_paths
from .recipe_files import STAGE_DATASET_KEYS
from .step_inputs import NOT_INPUT_KEYS, NOT_TRAINING_KEYS, as_opened, by_content, changed_inputs, reward_sources


class StageSteps:
    """Training-stage steps of a `Pipeline`, which provides `root`, `recipe`, `project`, `base_model`,
    `accelerate_config`, `num_processes`, `nodes`, `coordinator`, `digest`, `substitute`, `_record` and `_spawn`, and
    from the held-out steps `eval_settings`, `reevaluate` and the hashes `evaluate_base` sets (`base_hash`,
    `legacy_base_hashes`, `eval_hash`). `stage_hashes` keeps its last inputs besides the arguments in `inputs_now`."""

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
        left out, the ones with dataset paths as written (before `as_opened`) and the ones with the base model's
        folder as its path (before `base_spelling`), so their finished stages and checkpoints still count as the same
        inputs (the datasets are fingerprinted once for all: a data file without a
        card is hashed whole)."""
        datasets = {k: lineage.dataset_fingerprint(v) for k, v in args.items()
                    if k in STAGE_DATASET_KEYS and v}
        for index, phase in enumerate(args.get("phases") or []):  # a UPO curriculum phase's own prompt set
            if isinstance(phase, dict) and phase.get("dataset_name"):
                datasets[f"phases.{index}"] = lineage.dataset_fingerprint(phase["dataset_name"])
        datasets.update({f"rewards.{name}": source for name, source in reward_sources(args.get("rewards")).items()})
        prev_hash = json.loads((self.root / previous / "lineage.json").read_text())["inputs_hash"] if previous else None

        def digest(spelled, left_out, base, legacy) -> str:
            stable = {k: v for k, v in spelled.items() if k not in left_out}
            return self.digest({"args": stable, "datasets": datasets, "base": base, "previous": prev_hash}, legacy)

        self.inputs_now = {"datasets": datasets, "base_hash": self.base_hash, "previous_inputs_hash": prev_hash}
        return tuple(dict.fromkeys(
            digest(spelled, left_out, base, legacy) for legacy in (False, True)
            for spelled in (as_opened(args, by_content), as_opened(args), args)
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

    def _up_to_date(self, folder: Path, *digests: str) -> bool:
        return read_json(folder / "lineage.json").get("inputs_hash") in digests

    def _say_changed(self, stage: str, final: Path, args: dict) -> None:
        """Why a stage that finished earlier is trained again: which of its inputs changed, or that its lineage.json
        no longer reads (emptied or cut short since), so they cannot be told."""
        if read_json(final / "lineage.json"):
            console.print(f"{stage}: finished earlier with other inputs ({self.what_changed(final, args)}); trained "
                          "again")
        else:
            console.print(f"[yellow]{stage}: finished earlier, but its lineage.json is unreadable (what it was trained "
                          "on cannot be told): trained again[/yellow]")

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
            self._say_changed(stage, final, args)
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
        if self.coordinator:  # what follows `python -m accelerate.commands.launch`
            self.coordinator.announce(stage, cmd[3:], needs=self.shared_paths())
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

    def shared_paths(self) -> list[str]:
        """What the stages read on every machine from the path they have here: the base model and the files any
        stage's arguments or the evaluation (each process scores its share of the held-out prompts) name outside the
        run folder."""
        found = outside_paths(self.substitute([*self.recipe.stages.values(), self.recipe.eval.dataset]), self.root)
        return list(dict.fromkeys([str(self.base_model), *found]))

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
